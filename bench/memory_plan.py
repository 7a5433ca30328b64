"""The dry run's per-GPU peak memory and executed FLOPs for every checkpointing policy, over model sizes,
lengths and sequence-parallel sizes, in one table; and what `model.checkpointing=auto` picks.

    python bench/memory_plan.py                      # thinking_sft: 1.4B/2.6B, 4K-32K and 64K with SP=4, 8 GPUs
    python bench/memory_plan.py --sizes 1.4b --seq 8192 --gpus 8 --zero 3 --budgets 80 40

No GPU needed (train/memory.py traces one step per policy on fake tensors). Recipe defaults otherwise:
micro-batch 1, expected_logits, bf16, full fine-tuning, per-step losses only on logging steps
(train.log_every > 1). The baseline is the recipe's former fixed policy, `step+layer`, in the same table.
Writes JSON (`--json`); the table is printed last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ouro_train.config import DeepSpeedConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroConfig
from ouro_train.model.configuration import RELEASED_ARCHITECTURES
from ouro_train.model.flops import training_flops_per_token
from ouro_train.train.memory import GIB, StepShape, choose_checkpointing, fits, step_memory

BASELINE = "step+layer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(RELEASED_ARCHITECTURES), default=["1.4b", "2.6b"])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--sp-seq", type=int, nargs="*", default=[65536], help="lengths planned with --sp ranks per row")
    p.add_argument("--sp", type=int, default=4)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+", default=[80.0, 40.0], help="GiB per GPU auto must fit")
    p.add_argument("--json", type=Path, default=Path("outputs/bench/memory_plan.json"))
    args = p.parse_args()
    ds = DeepSpeedConfig(zero_stage=args.zero)
    cases = [(seq, 1) for seq in args.seq] + [(seq, args.sp) for seq in args.sp_seq]
    rows = []
    for size in args.sizes:
        config = OuroConfig(**RELEASED_ARCHITECTURES[size])
        config._attn_implementation = "sdpa"
        for seq, sp in cases:
            table = {}
            for policy in CHECKPOINT_GRANULARITIES:
                shape = StepShape(seq_len=seq, checkpointing=policy, sequence_parallel=sp)
                m = step_memory(config, shape, ds, args.gpus)
                table[policy] = dict(peak=m["peak"], executed_flops_per_token=m["executed_flops_per_token"],
                                     model_flops_per_token=training_flops_per_token(config, seq))
                rows.append(dict(size=size, seq=seq, sp=sp, policy=policy, peak_gib=m["peak"] / GIB,
                                 model_flops_per_token=table[policy]["model_flops_per_token"],
                                 executed_flops_per_token=m["executed_flops_per_token"],
                                 ratio=m["executed_flops_per_token"] / table[policy]["model_flops_per_token"]))
                print(f"{size} {seq} sp={sp} {policy}: {rows[-1]['peak_gib']:.2f} GiB, ratio {rows[-1]['ratio']:.3f}",
                      flush=True)
            for gib in args.budgets:
                rows.append(dict(size=size, seq=seq, sp=sp, auto_at_gib=gib, policy=choose_checkpointing(table, gib),
                                 fits=any(fits(r["peak"], gib) for r in table.values())))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = dict(gpus=args.gpus, zero=args.zero, baseline=BASELINE, rows=rows)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nZeRO-{args.zero}, {args.gpus} GPUs, micro-batch 1, bf16, expected_logits; peak GiB per GPU "
          f"(+1.5 GiB CUDA context) and executed ÷ model FLOPs; baseline {BASELINE} ({args.json})")
    policies = "".join(f"{p:>24}" for p in CHECKPOINT_GRANULARITIES)
    print(f"{'model':>6} {'seq':>6} {'SP':>3}{policies}   " + "  ".join(f"auto@{g:g}" for g in args.budgets))
    for size in args.sizes:
        for seq, sp in cases:
            cells = {r["policy"]: r for r in rows if (r["size"], r["seq"], r["sp"]) == (size, seq, sp) and "ratio" in r}
            autos = [r for r in rows if (r["size"], r["seq"], r["sp"]) == (size, seq, sp) and "auto_at_gib" in r]
            print(f"{size:>6} {seq:>6} {sp:>3}" + "".join(
                f"{cells[p]['peak_gib']:>16.1f} / {cells[p]['ratio']:>5.3f}" for p in CHECKPOINT_GRANULARITIES)
                + "   " + "  ".join(f"{r['policy'] if r['fits'] else '(none fits)':>8}" for r in autos))


if __name__ == "__main__":
    main()
