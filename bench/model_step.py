"""Forward+backward throughput and peak memory of the Ouro model alone (no optimizer, no DeepSpeed).

    python bench/model_step.py                               # CPU, tiny model
    python bench/model_step.py --shape 1.4b --seq 4096 8192  # CUDA, Ouro-1.4B shapes, bf16

Prints a table (tokens/s, MFU on CUDA, peak memory) and writes JSON (`--json`). The loss is upstream's
(cross-entropy of the exit-pdf-weighted logits); inputs are packed documents of random length.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import SHAPES, bench_config, packed_row
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroForCausalLM
from ouro_train.model.flops import model_flops_utilization

def run(args, seq: int, granularity: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = bench_config(args.shape, args.steps, seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = OuroForCausalLM(config).to(dtype).train()
    model.set_activation_checkpointing(granularity)
    gen = torch.Generator().manual_seed(0)
    ids, pos, labels = (t.to(device) for t in packed_row(seq, config.vocab_size, gen))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            loss = model(ids, position_ids=pos, labels=labels, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            loss = float(loss.detach())
    except torch.OutOfMemoryError:
        return dict(seq=seq, checkpointing=granularity, error="out of memory")
    step = sorted(times)[len(times) // 2]
    tok_s = seq / step
    result = dict(seq=seq, checkpointing=granularity, device=device.type, dtype=str(dtype), steps=args.steps,
                  tok_per_s=tok_s, step_s=step, loss=loss)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["mfu"] = model_flops_utilization(tok_s, config, seq, torch.cuda.get_device_name())
    else:  # each configuration runs in its own process, so this is its own peak
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_isolated(seq: int, granularity: str) -> dict:
    """One configuration in a fresh process: peak memory figures must not leak between runs."""
    cmd = [sys.executable, __file__, "--one", str(seq), granularity, *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.4b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192] if torch.cuda.is_available() else [512, 1024])
    p.add_argument("--checkpointing", nargs="+", default=["layer", "step+layer"], choices=CHECKPOINT_GRANULARITIES)
    p.add_argument("--steps", type=int, default=4, help="recurrent steps T")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("outputs/bench/model_step.json"))
    p.add_argument("--one", nargs=2, metavar=("SEQ", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run(args, int(args.one[0]), args.one[1])))
        return

    results = [run_isolated(seq, g) for seq in args.seq for g in args.checkpointing]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(shape=args.shape, torch=torch.__version__, results=results), indent=2))
    mem_key = "peak_gib" if torch.cuda.is_available() else "peak_rss_gib"
    print(f"\nshape={args.shape} T={args.steps} ({args.json})")
    print(f"{'seq':>6} {'checkpointing':>13} {'tok/s':>10} {'MFU':>6} {mem_key:>14}")
    for r in results:
        if "error" in r:
            print(f"{r['seq']:>6} {r['checkpointing']:>13} {r['error']:>32}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{r['seq']:>6} {r['checkpointing']:>13} {r['tok_per_s']:>10,.0f} {mfu:>6} {r[mem_key]:>14.2f}")


if __name__ == "__main__":
    main()
