"""The dry run's per-GPU peak memory estimate over model sizes, lengths and world sizes, in one table.

    python bench/memory_plan.py                                   # thinking_sft: 1.4B/2.6B, 4K-32K, 8/32 GPUs
    python bench/memory_plan.py --sizes 1.4b --seq 8192 --gpus 8 --checkpointing layer --zero 3

No GPU needed (train/memory.py traces one step on fake tensors). Recipe defaults otherwise: micro-batch
1, expected_logits, bf16, full fine-tuning.
"""

from __future__ import annotations

import argparse

from ouro_train.config import DeepSpeedConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroConfig
from ouro_train.model.configuration import RELEASED_ARCHITECTURES
from ouro_train.train.memory import CARDS_GIB, GIB, StepShape, fits, step_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(RELEASED_ARCHITECTURES), default=["1.4b", "2.6b"])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    p.add_argument("--checkpointing", default="step+layer", choices=CHECKPOINT_GRANULARITIES)
    p.add_argument("--zero", type=int, default=2)
    args = p.parse_args()
    ds = DeepSpeedConfig(zero_stage=args.zero)
    print(f"ZeRO-{args.zero}, checkpointing {args.checkpointing}, micro-batch 1, bf16; GiB per GPU")
    print(f"{'model':>6} {'seq':>6} {'GPUs':>5} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'peak':>7}  fits on")
    for size in args.sizes:
        config = OuroConfig(**RELEASED_ARCHITECTURES[size])
        config._attn_implementation = "sdpa"
        for seq in args.seq:
            shape = StepShape(seq_len=seq, checkpointing=args.checkpointing)
            traced = None
            for gpus in args.gpus:
                m = step_memory(config, shape, ds, gpus, activations=traced)
                traced = m["activations"]
                cards = " ".join(card for card, gib in CARDS_GIB.items() if fits(m["peak"], gib)) or "-"
                print(f"{size:>6} {seq:>6} {gpus:>5} " + " ".join(
                    f"{m[k] / GIB:>7.2f}" for k in ("parameters", "gradients", "optimizer", "activations", "peak"))
                    + f"  {cards}", flush=True)


if __name__ == "__main__":
    main()
