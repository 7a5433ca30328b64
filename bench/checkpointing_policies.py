"""What each activation checkpointing policy recomputes and keeps, at real shapes, without a GPU.

    python bench/checkpointing_policies.py                          # Ouro-1.4B at 4K and 8K
    python bench/checkpointing_policies.py --sizes 1.4b 2.6b --seq 8192 32768 --json out.json

Per policy: the FLOPs one training step executes (forward, recompute, backward; the upstream loss),
counted by torch's FLOP counter on fake tensors (shapes, no data: a 1.4B model at 32K counts in
seconds), divided by the count without checkpointing (the baseline, in the same run); the same ratio
from `model/flops.py`'s formula (attention causal, so half of what the counter charges for it); and the
estimated peak GiB per GPU (train/memory.py: ZeRO-2, 8 GPUs, micro-batch 1, bf16, full fine-tuning).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ouro_train.config import DeepSpeedConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroConfig, OuroForCausalLM
from ouro_train.model.configuration import RELEASED_ARCHITECTURES
from ouro_train.model.flops import hardware_flops_per_token, training_flops_per_token
from ouro_train.train.memory import GIB, StepShape, _SupervisedCount, run_step, step_memory


class FlopCount(TorchDispatchMode):
    """Torch's FLOP formulas summed over the operators run inside (FlopCounterMode's own module
    tracking fails inside the objective's no-grad and recomputed regions)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def executed_flops(config: OuroConfig, seq: int, policy: str) -> int:
    """FLOPs of the plan's step (train/memory.py: forward, upstream loss, backward) on one row of `seq`
    tokens, counted on fake tensors."""
    with torch.device("meta"):
        model = OuroForCausalLM(config).to(torch.bfloat16)
    model.set_activation_checkpointing(policy)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        with FlopCount() as counter, _SupervisedCount(seq - 1):
            run_step(model, StepShape(seq_len=seq, checkpointing=policy))
    return counter.total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(RELEASED_ARCHITECTURES), default=["1.4b"])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--policies", nargs="+", choices=CHECKPOINT_GRANULARITIES, default=list(CHECKPOINT_GRANULARITIES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory estimate")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    ds = DeepSpeedConfig(zero_stage=2)
    rows = []
    for size in args.sizes:
        config = OuroConfig(**RELEASED_ARCHITECTURES[size])
        config._attn_implementation = "sdpa"
        config.use_cache = False
        for seq in args.seq:
            baseline = executed_flops(config, seq, "none")
            for policy in args.policies:
                counted = executed_flops(config, seq, policy)
                formula = hardware_flops_per_token(config, seq, policy) / hardware_flops_per_token(config, seq, "none")
                row = dict(model=size, seq=seq, policy=policy, executed_flops=counted, counted_ratio=counted / baseline,
                           formula_ratio=formula,
                           formula_over_model=hardware_flops_per_token(config, seq, policy)
                           / training_flops_per_token(config, seq))
                if not args.no_memory:
                    shape = StepShape(seq_len=seq, checkpointing=policy)
                    row["peak_gib"] = step_memory(config, shape, ds, 8)["peak"] / GIB
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\nexecuted FLOPs per policy ÷ the same step without checkpointing (counted on fake tensors; formula: "
          "model/flops.py, causal attention); executed ÷ model FLOPs by the formula; peak GiB: ZeRO-2, 8 GPUs, bf16")
    print(f"{'model':>5} {'seq':>6} {'policy':>23} {'counted':>8} {'formula':>8} {'exec/model':>10} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:>9.1f}" if "peak_gib" in r else f"{'-':>9}"
        print(f"{r['model']:>5} {r['seq']:>6} {r['policy']:>23} {r['counted_ratio']:>8.3f} {r['formula_ratio']:>8.3f} "
              f"{r['formula_over_model']:>10.3f} {peak}")


if __name__ == "__main__":
    main()
