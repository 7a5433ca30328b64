"""`ouro-eval`: per-recurrent-step evaluation of an exported model on held-out chat data.

    ouro-eval --model DIR --data heldout.jsonl --out DIR [--ut-steps 1,2,3,4,5,6,7,8] [--generate]

Writes DIR/eval.json and DIR/eval.png. Per recurrent step T: loss and perplexity of the assistant
tokens, exit-pdf mean step and entropy; with --generate, greedy final-answer accuracy and the mean
steps used, per T (all steps run) and per early-exit threshold (at the model's trained T).

Two more forms: `ouro-eval --benchmark NAME ...` samples reasoning benchmarks the paper's way
(`ouro-eval --benchmark aime24 --help`), and `ouro-eval score --predictions FILE --out DIR` scores
completions made elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ouro_train.data.validate import DataError
from ouro_train.eval import benchmark_cli, score
from ouro_train.eval.answers import answer_tasks, score_answers
from ouro_train.eval.benchmark_cli import float_list, int_list
from ouro_train.eval.data import loss_batches, read_conversations
from ouro_train.eval.plot import plot_eval
from ouro_train.generation.chat import GenerationSettings, load_model, stop_token_ids
from ouro_train.generation.early_exit import KV_FILLS
from ouro_train.model.loss import evaluate_loss_per_step


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score.main(argv[1:])
    if any(a == "--benchmark" or a.startswith("--benchmark=") for a in argv):
        return benchmark_cli.main(argv)
    args = _parser().parse_args(argv)
    try:
        conversations = read_conversations(args.data, args.max_samples)
    except DataError as e:
        raise SystemExit(f"ouro-eval: {e}") from None
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    trained_steps = model.config.total_ut_steps
    ut_steps = args.ut_steps or list(range(1, trained_steps + 1))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else stop_token_ids(tokenizer)[-1]

    start = time.perf_counter()
    batches = loss_batches(conversations, tokenizer, args.batch_size, pad, args.max_seq_len)
    result = {"model": str(args.model), "data": str(args.data), "samples": len(conversations),
              "trained_ut_steps": trained_steps, **evaluate_loss_per_step(model, batches, ut_steps)}
    _log(f"loss per step over {result['tokens']} tokens of {len(conversations)} conversations "
         f"({time.perf_counter() - start:.1f} s)")

    if args.generate:
        tasks = answer_tasks(conversations)
        if not tasks:
            raise SystemExit(f"ouro-eval: no conversation in {args.data} ends with a stated answer "
                             "('The answer is ...')")
        greedy = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0, kv_fill=args.kv_fill,
                                    think=args.think)
        for row in result["per_step"]:
            all_steps = replace(greedy, ut_steps=row["ut_steps"], exit_threshold=1.0)
            row.update(score_answers(model, tokenizer, tasks, all_steps, args.batch_size))
            _log(f"T={row['ut_steps']}: accuracy {row['accuracy']:.3f}")
        result["per_threshold"] = []
        for threshold in args.thresholds:
            scores = score_answers(model, tokenizer, tasks, replace(greedy, exit_threshold=threshold), args.batch_size)
            result["per_threshold"].append({"threshold": threshold, "ut_steps": trained_steps, **scores})
            _log(f"threshold {threshold:g}: accuracy {scores['accuracy']:.3f} at {scores['mean_steps']:.2f} "
                 "steps per token")
        result["generation"] = {"samples": len(tasks), "max_new_tokens": args.max_new_tokens, "think": args.think,
                                "kv_fill": args.kv_fill, "decoding": "greedy"}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_eval(result, args.out / "eval.png")
    for row in result["per_step"]:
        accuracy = f"  accuracy {row['accuracy']:.3f}" if "accuracy" in row else ""
        print(f"T={row['ut_steps']}: loss {row['loss']:.4f}  ppl {row['ppl']:.2f}  exit mean step "
              f"{row['exit_mean_step']:.2f}{accuracy}")
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.png'}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", type=Path, required=True, help="an exported model directory")
    p.add_argument("--data", type=Path, required=True, help="held-out chat jsonl (messages, prompt/response, ...)")
    p.add_argument("--out", type=Path, required=True, help="directory for eval.json and eval.png")
    p.add_argument("--ut-steps", type=int_list, help="recurrent steps to evaluate, e.g. 1,2,3,4 (default: 1..trained T)")
    p.add_argument("--thresholds", type=float_list, default=[0.5, 0.7, 0.9, 1.0],
                   help="early-exit thresholds for --generate (default: 0.5,0.7,0.9,1.0)")
    p.add_argument("--max-samples", type=int, help="evaluate the first N conversations")
    p.add_argument("--generate", action="store_true", help="also score final answers of greedy generations")
    p.add_argument("--think", action="store_true", help="open generated assistant turns with <think>")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--kv-fill", choices=KV_FILLS, default="copy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, help="cut longer conversations for the loss")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
