"""Throughput and peak memory of `ouro-prepare` with the real Ouro tokenizer, against a plain baseline.

    python bench/prepare_throughput.py [--tokenizer ../shared/ouro-1.4b-files] [--rows 100000]
                                       [--num-proc 1 2] [--rss-rows 100000 400000] [--mean-tokens 4000]
                                       [--out FILE.json]

Generates `--rows` synthetic conversations (half `messages` JSON Lines with multi-turn chat, half
`sharegpt` with a <think> block, a few hundred to a few thousand tokens each), then runs the whole
prepare pipeline on them for each `--num-proc` (a fresh process and cache each time): load + validate,
then tokenize (`.map(num_proc)`), pack and write. Reports examples/s and tokens/s per process, CPU
seconds, and best-fit packing time per document (single process) on lengths shaped like long
reasoning data.

Baseline, in the same run on the same rows: `datasets.load_dataset("json")` + `.map` of
`tokenizer.apply_chat_template(tokenize=True)` (ids only: no validation, masks, packing or cache), one
process; the ratios printed are ours / baseline in examples/s (wall) and in CPU seconds (the fairer
one on a machine other jobs share).

Memory: a one-process prepare of each `--rss-rows` size runs in a fresh process of its own, with a
thread sampling /proc/self/status every 20 ms. Reported: the peak of anonymous memory (RssAnon: heap,
what the process needs), the peak of file-backed pages (RssFile: memory-mapped Arrow and .npy files,
clean page cache the kernel can take back), the kernel's peak of their sum (VmHWM), the anonymous
memory before the prepare started (interpreter, libraries, tokenizer), and the bytes of the token
arrays written (tokens.npy + supervised.npy) for comparison.

Projection for the full mix (8,275,000 examples) on a 32-core node: load + validate + tokenize scale
with processes (the measured 1 -> 2 process scaling is shown); packing is one process. The real mix
is far longer per example than the synthetic rows, so its wall time is projected from tokens/s with
`--mean-tokens` tokens per example (an assumption; the real figure is in the manifest after a run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: per-process numbers

import datasets  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from ouro_train.config import DataConfig, SourceConfig  # noqa: E402
from ouro_train.data import prepare  # noqa: E402
from ouro_train.data.pack import best_fit_decreasing  # noqa: E402
from ouro_train.data import pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIX_EXAMPLES = 3_500_000 + 3_200_000 + 808_000 + 767_000
NODE_CORES = 32
WORDS = ("the of and to in is that for it as with was on be by this are from at an which we can not we "
         "value function result equation therefore because number solve sum product prime integer list "
         "return compute check case step first second then so next total answer consider assume").split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    if rng.random() < 0.4:
        words.insert(rng.randint(0, len(words)), f"{rng.randint(2, 999)} + {rng.randint(2, 999)} = {rng.randint(4, 1998)}")
    if rng.random() < 0.15:
        words.append(f"`def f(x): return x * {rng.randint(2, 9)}`")
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def write_rows(directory: Path, rows: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    chat_path, think_path = directory / "chat.jsonl", directory / "think.jsonl"
    with open(chat_path, "w") as chat, open(think_path, "w") as think:
        for i in range(rows):
            if i % 2:
                turns = []
                for _ in range(rng.randint(1, 3)):
                    turns += [{"role": "user", "content": paragraph(rng, rng.randint(1, 4))},
                              {"role": "assistant", "content": paragraph(rng, rng.randint(3, 12))}]
                chat.write(json.dumps({"messages": turns}) + "\n")
            else:
                reasoning = "\n\n".join(paragraph(rng, rng.randint(3, 8)) for _ in range(rng.randint(2, 12)))
                conv = [{"from": "human", "value": paragraph(rng, rng.randint(1, 5))},
                        {"from": "gpt", "value": f"<think>\n{reasoning}\n</think>\n\n{paragraph(rng, rng.randint(1, 4))}"}]
                think.write(json.dumps({"conversations": conv}) + "\n")
    return [chat_path, think_path]


def run_prepare(files: list[Path], tokenizer_dir: Path, num_proc: int, work: Path) -> dict:
    """One prepare, in the calling process: timings, counts and this process's memory."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    sources = [SourceConfig(name=f.stem, path=str(f)) for f in files]
    data = DataConfig(sources=sources, max_seq_len=32768, num_proc=num_proc, cache_dir=str(work / f"cache-{num_proc}"))
    check, checked = pipeline.check_sources, []

    def timed_check(*args, **kwargs):  # the prepare's own load + validate, timed from inside it
        start = time.perf_counter()
        try:
            return check(*args, **kwargs)
        finally:
            checked.append(time.perf_counter() - start)

    pipeline.check_sources = timed_check
    sampler = MemorySampler()
    cpu, start = cpu_seconds(), time.perf_counter()
    try:
        with sampler:
            prepared = prepare(data, tokenizer, log=lambda _: None)
    finally:
        pipeline.check_sources = check
    total = time.perf_counter() - start
    manifest = prepared.manifest
    examples, tokens = manifest["num_documents"], manifest["num_tokens"]
    return {
        "num_proc": num_proc,
        "examples": examples,
        "tokens": tokens,
        "mean_tokens_per_example": tokens / examples,
        "seconds_total": total,
        "seconds_load_validate": checked[0],
        "seconds_tokenize_pack_write": total - checked[0],
        "examples_per_s_per_process": examples / total / num_proc,
        "tokens_per_s_per_process": tokens / total / num_proc,
        "packing_efficiency": manifest["packing_efficiency"],
        "cpu_seconds": cpu_seconds() - cpu,  # this process only: with num_proc > 1 the workers are not in it
        **sampler.result(),
        "token_arrays_gib": sum((prepared.path / f"{a}.npy").stat().st_size for a in ("tokens", "supervised")) / 2**30,
    }


class MemorySampler:
    """Peaks of this process's anonymous and file-backed resident memory, sampled every `interval` s
    while the block runs, with the kernel's exact peak of their sum (VmHWM)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.before = interval, {"RssAnon": 0, "RssFile": 0}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            now = memory_kib()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], now[k])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemorySampler":
        self.before = memory_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        end = memory_kib()
        gib = 2**20  # KiB per GiB
        return {
            "rss_anon_before_gib": self.before["RssAnon"] / gib,
            "peak_rss_anon_gib": max(self.peak["RssAnon"], end["RssAnon"]) / gib,
            "peak_rss_file_gib": max(self.peak["RssFile"], end["RssFile"]) / gib,
            "peak_rss_gib": end["VmHWM"] / gib,  # anonymous + file-backed + shared, the kernel's high-water mark
            "rss_anon_at_end_gib": end["RssAnon"] / gib,
            "rss_file_at_end_gib": end["RssFile"] / gib,
        }


def memory_kib() -> dict:
    """RssAnon, RssFile and VmHWM of this process now, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile", "VmHWM")}


def cpu_seconds() -> float:
    """This process's user + system CPU time: less sensitive than wall time to other work on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


MEMORY_KEYS = ("examples", "tokens", "token_arrays_gib", "rss_anon_before_gib", "peak_rss_anon_gib", "peak_rss_file_gib",
               "peak_rss_gib", "rss_anon_at_end_gib", "rss_file_at_end_gib", "examples_per_s_per_process",
               "tokens_per_s_per_process", "cpu_seconds")


def in_fresh_process(function, *args):
    """function(*args) in a new interpreter, so its peak RSS is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def run_baseline(files: list[Path], tokenizer_dir: Path, work: Path) -> dict:
    """The same rows through datasets' json loader and apply_chat_template(tokenize=True), one process."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    cpu, start, examples, tokens = cpu_seconds(), time.perf_counter(), 0, 0
    for f in files:
        rows = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=str(work / "baseline"))
        ids = rows.map(template_ids, batched=True, remove_columns=rows.column_names, fn_kwargs={"tokenizer": tokenizer},
                       cache_file_name=str(work / "baseline" / f"{f.stem}.arrow"))
        examples += len(ids)
        tokens += int(sum(ids.with_format("numpy")["length"]))
    seconds = time.perf_counter() - start
    return {"examples": examples, "tokens": tokens, "seconds_total": seconds, "cpu_seconds": cpu_seconds() - cpu,
            "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}


def template_ids(batch: dict, tokenizer) -> dict:
    if "messages" in batch:
        conversations = batch["messages"]
    else:
        roles = {"human": "user", "gpt": "assistant"}
        conversations = [[{"role": roles[t["from"]], "content": t["value"]} for t in c] for c in batch["conversations"]]
    ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False)
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def packing_seconds_per_doc(n: int = 1_000_000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(3000), 1.0, size=n).astype(np.int64), 64, 32768)
    start = time.perf_counter()
    best_fit_decreasing(lengths, 32768)
    return (time.perf_counter() - start) / n


def report_throughput(args, runs: list, baseline: dict, base: dict, result: dict) -> None:
    """Print the timed runs, the projection and the comparison with the baseline; add them to `result`."""
    pack_s = packing_seconds_per_doc()
    ex_s, tok_s = base["examples_per_s_per_process"], base["tokens_per_s_per_process"]
    projection = {
        "examples": MIX_EXAMPLES,
        "processes": NODE_CORES,
        "assumed_tokens_per_example": args.mean_tokens,
        "packing_hours": pack_s * MIX_EXAMPLES / 3600,
        "hours_at_bench_row_length": (MIX_EXAMPLES / (ex_s * NODE_CORES) + pack_s * MIX_EXAMPLES) / 3600,
        "hours_at_assumed_length": (MIX_EXAMPLES * args.mean_tokens / (tok_s * NODE_CORES) + pack_s * MIX_EXAMPLES) / 3600,
        "assumes": "linear scaling to 32 processes of load/validate/tokenize; packing in one process; hub download not included",
    }
    result.update({
        "rows": args.rows,
        "runs": runs,
        "baseline": baseline,
        "ratio_to_baseline_examples_per_s": ex_s / baseline["examples_per_s"],
        "ratio_to_baseline_tokens_per_s": tok_s / baseline["tokens_per_s"],
        "ratio_to_baseline_cpu": baseline["cpu_seconds"] / base["cpu_seconds"],
        "packing_seconds_per_document": pack_s,
        "projection_thinking_mix_32_cores": projection,
    })
    print(f"{'procs':>5} {'examples':>9} {'tok/ex':>7} {'load+check s':>12} {'tok+pack s':>10} "
          f"{'ex/s/proc':>10} {'tok/s/proc':>11} {'speed-up':>8}")
    for r in runs:
        speedup = base["seconds_total"] / r["seconds_total"]
        print(f"{r['num_proc']:>5} {r['examples']:>9,} {r['mean_tokens_per_example']:>7,.0f} {r['seconds_load_validate']:>12.1f} "
              f"{r['seconds_tokenize_pack_write']:>10.1f} {r['examples_per_s_per_process']:>10,.0f} "
              f"{r['tokens_per_s_per_process']:>11,.0f} {speedup:>8.2f}")
    print(f"best-fit packing: {pack_s * 1e6:.1f} us per document (one process)")
    p = projection
    print(f"projected wall time, {p['examples']:,} examples on {p['processes']} cores: "
          f"{p['hours_at_bench_row_length']:.2f} h at the bench's row length, "
          f"{p['hours_at_assumed_length']:.2f} h at {args.mean_tokens:,.0f} tokens/example "
          f"(packing {p['packing_hours'] * 60:.1f} min of it)")
    b = baseline
    print(f"\nbaseline: load_dataset json + map apply_chat_template(tokenize=True), ids only, 1 process, same rows "
          f"({b['tokens'] / b['examples']:,.0f} tok/ex in its count, {base['mean_tokens_per_example']:,.0f} in ours)")
    print(f"{'':<10} {'examples/s':>10} {'tokens/s':>10} {'CPU s':>7}")
    print(f"{'ours':<10} {ex_s:>10,.0f} {tok_s:>10,.0f} {base['cpu_seconds']:>7.1f}")
    print(f"{'baseline':<10} {b['examples_per_s']:>10,.0f} {b['tokens_per_s']:>10,.0f} {b['cpu_seconds']:>7.1f}")
    print(f"{'ratio':<10} {ex_s / b['examples_per_s']:>9.2f}x {tok_s / b['tokens_per_s']:>9.2f}x "
          f"{b['cpu_seconds'] / base['cpu_seconds']:>6.2f}x   (ours / baseline; CPU: baseline s / ours s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "ouro-1.4b-files")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, nargs="*", default=[1, 2],
                        help="process counts to time (none: only the memory measurements)")
    parser.add_argument("--rss-rows", type=int, nargs="*", default=[100_000, 400_000], help="corpus sizes for peak RSS")
    parser.add_argument("--mean-tokens", type=float, default=4000.0, help="assumed tokens per example of the real mix")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "prepare_throughput.json")
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.json").exists():
        sys.exit(f"no tokenizer at {args.tokenizer} (pass --tokenizer DIR)")
    load_before = os.getloadavg()[0]  # other work on the machine skews the numbers: recorded with them

    runs, baseline, base = [], None, None
    if args.num_proc:
        with tempfile.TemporaryDirectory(prefix="ouro-prepare-bench-") as tmp:
            work = Path(tmp)
            files = write_rows(work, args.rows)
            runs = [in_fresh_process(run_prepare, files, args.tokenizer, n, work) for n in args.num_proc]
            baseline = in_fresh_process(run_baseline, files, args.tokenizer, work)
        base = next((r for r in runs if r["num_proc"] == 1), runs[0])  # speed-ups and projection relative to it
    memory = []
    for rows in args.rss_rows:
        r = base
        if base is None or (rows, base["num_proc"]) != (args.rows, 1):  # else the one-process run above is that measurement
            with tempfile.TemporaryDirectory(prefix="ouro-prepare-rss-") as tmp:
                r = in_fresh_process(run_prepare, write_rows(Path(tmp), rows), args.tokenizer, 1, Path(tmp))
        memory.append({"rows": rows, **{k: r[k] for k in MEMORY_KEYS}})
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before_after": [load_before, os.getloadavg()[0]],
        },
        "tokenizer": str(args.tokenizer),
        "memory": memory,
    }
    if runs:
        report_throughput(args, runs, baseline, base, result)
    if memory:
        print(f"\nmemory of a one-process prepare, each size in a fresh process (GiB; anon = heap, file = mapped pages)")
        print(f"{'rows':>9} {'tokens':>12} {'token arrays':>12} {'anon before':>11} {'peak anon':>9} "
              f"{'anon growth':>11} {'peak file':>9} {'peak total':>10} {'ex/s':>6}")
        for m in memory:
            print(f"{m['rows']:>9,} {m['tokens']:>12,} {m['token_arrays_gib']:>12.3f} {m['rss_anon_before_gib']:>11.3f} "
                  f"{m['peak_rss_anon_gib']:>9.3f} {m['peak_rss_anon_gib'] - m['rss_anon_before_gib']:>11.3f} "
                  f"{m['peak_rss_file_gib']:>9.3f} {m['peak_rss_gib']:>10.3f} {m['examples_per_s_per_process']:>6,.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
