"""`ouro-eval --benchmark`: sampled pass@k of an exported model on reasoning benchmarks, per recurrent
step T and per early-exit threshold.

    ouro-eval --benchmark aime24 --data aime24.jsonl --model DIR --out DIR \\
        [--samples 10] [--ut-steps 1,2,3,4,5,6,7,8] [--thresholds 0.5,0.7,0.9] [--resume]

`--benchmark`/`--data` may be repeated (paired in order; without `--data` each benchmark reads its
default hub dataset). Every T in `--ut-steps` runs all its steps for every token; every threshold runs
the trained T with compute-saving early exit. Writes DIR/predictions.jsonl (one row per sample, appended
as problems finish; `--resume` continues a killed run), DIR/run.json (the settings a resume must
share), DIR/eval.json and DIR/eval.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ouro_train.data.validate import DataError
from ouro_train.eval.benchmarks import BENCHMARKS, DataRef, get_benchmark
from ouro_train.eval.plot import plot_benchmarks
from ouro_train.eval.sampling import Setting, read_done, sample_benchmark, summarise
from ouro_train.generation.chat import GenerationSettings, complete_chats, load_model, prompt_ids
from ouro_train.generation.early_exit import KV_FILLS

PAPER_MAX_NEW_TOKENS = 30720


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    _check(args)
    ks = args.pass_k or sorted({1, args.samples})
    refs = [DataRef.parse(d) for d in args.data] or [None] * len(args.benchmark)
    try:
        problems = {name: get_benchmark(name).load(ref, args.seed, args.max_problems)
                    for name, ref in zip(args.benchmark, refs)}
    except DataError as e:
        raise SystemExit(f"ouro-eval: {e}") from None
    run = {"model": str(args.model), "data": [str(r or get_benchmark(n).default_data) for n, r in zip(args.benchmark, refs)],
           "samples": args.samples, "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p,
           "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "think": args.think,
           "kv_fill": args.kv_fill, "backend": args.backend, "max_problems": args.max_problems}
    predictions = _start_run_dir(args.out, run, args.resume)

    config, tokenizer, complete = _backend(args)
    trained = config.total_ut_steps
    settings = [Setting(t) for t in args.ut_steps or [trained]] + [Setting(trained, x) for x in args.thresholds]
    done = read_done(predictions, args.samples)

    result = {"model": str(args.model), "trained_ut_steps": trained, "generation": run, "benchmarks": {}}
    for name, data in zip(args.benchmark, run["data"]):
        longest = max(len(prompt_ids(tokenizer, p.prompt, args.think)) for p in problems[name])
        max_new = min(args.max_new_tokens, config.max_position_embeddings - longest)
        if max_new < 1:
            raise SystemExit(f"ouro-eval: a {name} prompt of {longest} tokens fills the model's context "
                             f"({config.max_position_embeddings})")
        generation = GenerationSettings(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                                        kv_fill=args.kv_fill, think=args.think)
        scores = {"data": data, "problems": len(problems[name]), "max_new_tokens": max_new,
                  "per_step": [], "per_threshold": []}
        for setting in settings:
            rows = sample_benchmark(complete, name, problems[name], setting, generation, args.samples,
                                    args.batch_size, args.seed, predictions, done)
            summary = {**asdict(setting), **summarise(rows, ks)}
            scores["per_step" if setting.threshold >= 1.0 else "per_threshold"].append(summary)
            _log(f"{name} {setting.label}: " + "  ".join(f"{k} {summary[k]:.3f}" for k in summary if k.startswith("pass@"))
                 + f"  {summary['mean_steps']:.2f} steps/token  {summary['tok_per_s']:.1f} tok/s")
        result["benchmarks"][name] = scores

    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_benchmarks(result, args.out / "eval.png")
    print(f"wrote {predictions}, {args.out / 'eval.json'} and {args.out / 'eval.png'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-eval --benchmark", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--benchmark", action="append", required=True, choices=list(BENCHMARKS), help="repeatable")
    p.add_argument("--data", action="append", default=[],
                   help="FILE (jsonl/json/parquet) or HUB_ID[:SUBSET][@SPLIT], one per --benchmark")
    p.add_argument("--model", type=Path, required=True, help="an exported model directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=1, help="completions per problem (the paper: 10 for pass@10)")
    p.add_argument("--pass-k", type=int_list, help="k values reported, e.g. 1,10 (default: 1 and --samples)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0, the paper's)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus mass (default 0.7, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_MAX_NEW_TOKENS,
                   help=f"per completion, capped by the context left after the longest prompt (default {PAPER_MAX_NEW_TOKENS})")
    p.add_argument("--ut-steps", type=int_list, default=[], help="T values, all steps per token (default: the trained T)")
    p.add_argument("--thresholds", type=float_list, default=[], help="early-exit thresholds at the trained T, e.g. 0.5,0.7,0.9")
    p.add_argument("--batch-size", type=int, default=16, help="completions generated together")
    p.add_argument("--max-problems", type=int, help="the first N problems of each benchmark")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                   help="open the assistant turn with <think> (default: on, for Thinking models)")
    p.add_argument("--kv-fill", choices=KV_FILLS, default="copy", help="KV of the steps an exited token skips")
    p.add_argument("--backend", choices=["ours", "vllm"], default="ours",
                   help="vllm: full-T rows only (vLLM has no adaptive exit); needs vllm installed")
    p.add_argument("--resume", action="store_true", help="continue DIR/predictions.jsonl of the same settings")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def _check(args) -> None:
    """Every flag value checked before any data or weights are read."""
    problems = []
    if args.data and len(args.data) != len(args.benchmark):
        problems.append(f"{len(args.data)} --data for {len(args.benchmark)} --benchmark (give one each, or none)")
    if len(set(args.benchmark)) != len(args.benchmark):
        problems.append(f"--benchmark repeats a name: {args.benchmark}")
    for flag, value, ok, rule in [
        ("--samples", args.samples, args.samples >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--max-problems", args.max_problems, args.max_problems is None or args.max_problems >= 1, ">= 1"),
        ("--ut-steps", args.ut_steps, all(t >= 1 for t in args.ut_steps), "positive"),
        ("--thresholds", args.thresholds, all(0 < x < 1 for x in args.thresholds), "in (0, 1)"),
        ("--pass-k", args.pass_k, all(1 <= k <= args.samples for k in args.pass_k or []), f"in 1..--samples ({args.samples})"),
    ]:
        if not ok:
            problems.append(f"{flag} must be {rule}, got {value}")
    if args.backend == "vllm":
        if args.thresholds:
            problems.append("--thresholds needs --backend ours: vLLM has no adaptive exit (every token runs all T steps)")
        if importlib.util.find_spec("vllm") is None:
            problems.append("--backend vllm: vllm is not installed (pip install vllm; it is not a dependency)")
    if problems:
        raise SystemExit("ouro-eval: " + "; ".join(problems))


def _start_run_dir(out: Path, run: dict, resume: bool) -> Path:
    predictions, recorded = out / "predictions.jsonl", out / "run.json"
    if predictions.exists() and not resume:
        raise SystemExit(f"ouro-eval: {predictions} exists: pass --resume to continue it, or choose another --out")
    if resume and recorded.exists():
        before = json.loads(recorded.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in run.items() if before.get(k) != v]
        if changed:
            raise SystemExit(f"ouro-eval: --resume with other settings than {recorded}: " + "; ".join(changed))
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(run, indent=2) + "\n")
    return predictions


def _backend(args):
    """(model config, tokenizer, Complete) of the chosen backend; vLLM loads the weights itself."""
    if args.backend == "vllm":
        from ouro_train.eval.vllm_backend import vllm_complete

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return AutoConfig.from_pretrained(args.model), tokenizer, vllm_complete(args.model, tokenizer, args.dtype)
    model, tokenizer = load_model(args.model, args.dtype, args.device)

    def complete(conversations, settings, seed):
        generator = torch.Generator(device=model.device).manual_seed(seed)
        return complete_chats(model, tokenizer, conversations, settings, args.batch_size, generator)

    return model.config, tokenizer, complete


def int_list(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (a flag value)."""
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _log(message: str) -> None:
    print(message, file=sys.stderr)
