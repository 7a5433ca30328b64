"""Training-step throughput of `ouro-train`'s step against a plain baseline, in one run.

    python bench/train_throughput.py                          # CUDA: Ouro-1.4B shapes, 4K..32K, bf16
    python bench/train_throughput.py --shape tiny --seq 256 512   # CPU check that every variant runs

Each variant runs the real step: a DeepSpeed engine (ZeRO-2, AdamW, bf16 on CUDA) over our model,
forward + loss + backward + optimizer step, micro-batch 1, on a packed row of documents.
  baseline  per-layer checkpointing, SDPA causal over the whole row, upstream's loss (CE of the
            pdf-weighted mixture of T full [S, V] logits tensors: `model(labels=...)`)
  ours      our objective (chunked, fused expected_logits), packed-document attention (FlexAttention
            on CUDA), checkpointing `layer` up to 8K and `step+layer` beyond
  ours_lora the same with LoRA r=16 on every linear projection
  ours_sp   `ours` under Ulysses sequence parallelism (`--sequence-parallel N`, launched on a multiple of
            N processes): each group of N ranks shares one row, S/N tokens per rank; its baseline in
            the same run is `ours`, every rank training on a whole row of its own
Prints tok/s (per GPU: tokens of the rows trained ÷ time ÷ GPUs), MFU (FLOPs per token and the device's
bf16 peak from `ouro_train.model.flops`), peak GiB, the ratio to the baseline and, for ours_sp, the
time per step spent in the all-to-alls (forward, backward and recomputation); writes JSON (`--json`).

    torchrun --nproc_per_node 2 bench/train_throughput.py --sequence-parallel 2 --seq 256 512   # CPU (gloo)
    torchrun --nproc_per_node 8 bench/train_throughput.py --sequence-parallel 4 --seq 32768 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import SHAPES, bench_config, packed_row
from ouro_train.config import DeepSpeedConfig, LoraConfig, ObjectiveConfig, OptimConfig
from ouro_train.model import OuroForCausalLM
from ouro_train.model.flops import model_flops_utilization
from ouro_train.model.sequence_parallel import AllToAllTimer
from ouro_train.train.engine import build_ds_config, init_distributed, param_groups, sequence_parallel_group
from ouro_train.train.lora import apply_lora
from ouro_train.train.objectives import compute_objective

VARIANTS = ("baseline", "ours", "ours_lora", "ours_sp")


def checkpointing(variant: str, seq: int) -> str:
    return "layer" if variant == "baseline" or seq <= 8192 else "step+layer"


def build_engine(args, variant: str, seq: int):
    import deepspeed

    config = bench_config(args.shape, args.steps, seq)
    torch.manual_seed(0)
    model = OuroForCausalLM(config)
    model.set_activation_checkpointing(checkpointing(variant, seq))
    if variant == "ours_lora":
        model = apply_lora(model, LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0))
    ds = build_ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(lr=1e-5), micro_batch=1, grad_accum=1,
                         world_size=dist.get_world_size())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    return engine, config


def step_fn(engine, variant: str, batch, device, sp=None):
    ids, positions, labels = (t.to(device) for t in batch)
    if variant == "baseline":
        loss = engine(ids, labels=labels, use_cache=False).loss
    else:
        kwargs = {} if sp is None else {"sequence_parallel": sp}
        out = engine(ids, position_ids=positions, use_cache=False, compute_logits=False, **kwargs)
        labels = labels if sp is None else sp.shard_labels(labels)
        obj = compute_objective(ObjectiveConfig(), out, labels, engine.module.get_output_embeddings())
        loss = obj.loss_sum / obj.num_tokens.clamp_min(1)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def measure(args, variant: str, seq: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = dict(variant=variant, seq=seq, checkpointing=checkpointing(variant, seq))
    sp = args.sp_group if variant == "ours_sp" else None
    gpus_per_row = sp.size if sp is not None else 1
    a2a = []
    try:
        engine, config = build_engine(args, variant, seq)
        batch = packed_row(seq, config.vocab_size, torch.Generator().manual_seed(seq))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.iters):
            if sp is not None:
                sp.timer.reset()
            dist.barrier()
            start = time.perf_counter()
            result["loss"] = step_fn(engine, variant, batch, device, sp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                if sp is not None:
                    a2a.append(sp.timer.seconds)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step_s = sorted(times)[len(times) // 2]
    result["step_s"] = step_s
    result["tok_per_s"] = seq / gpus_per_row / step_s  # per GPU
    if sp is not None:
        result["sequence_parallel"] = sp.size
        result["all_to_all_s_per_step"] = sorted(a2a)[len(a2a) // 2]
        result["all_to_all_calls_per_step"] = sp.timer.calls
        result["all_to_all_share"] = result["all_to_all_s_per_step"] / step_s
    if device.type == "cuda":
        result["mfu"] = model_flops_utilization(result["tok_per_s"], config, seq, torch.cuda.get_device_name())
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine
    return result


def main() -> None:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.4b" if on_gpu else "tiny")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768] if on_gpu else [256, 512])
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="default: baseline ours ours_lora; with --sequence-parallel: ours ours_sp")
    p.add_argument("--lora-seq", type=int, nargs="+", help="run ours_lora only at these lengths (default: every --seq)")
    p.add_argument("--steps", type=int, default=4, help="recurrent steps T")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="ranks per row for ours_sp (run on a multiple of N processes); default variants then: ours ours_sp")
    p.add_argument("--json", type=Path, default=Path("outputs/bench/train_throughput.json"))
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    rank, _, world = init_distributed()
    n = args.sequence_parallel
    if n > 1:
        if world % n:
            p.error(f"--sequence-parallel {n} needs a multiple of {n} processes (torchrun --nproc_per_node), got {world}")
        args.sp_group = dataclasses.replace(sequence_parallel_group(n), timer=AllToAllTimer())
    elif args.variants and "ours_sp" in args.variants:
        p.error("ours_sp needs --sequence-parallel N (N > 1)")
    args.variants = args.variants or (["ours", "ours_sp"] if n > 1 else ["baseline", "ours", "ours_lora"])
    reference = "ours" if n > 1 else "baseline"

    results = [measure(args, v, seq) for seq in args.seq for v in args.variants
               if v != "ours_lora" or args.lora_seq is None or seq in args.lora_seq]
    baseline = {r["seq"]: r.get("tok_per_s") for r in results if r["variant"] == reference}
    for r in results:
        if r.get("tok_per_s") and baseline.get(r["seq"]):
            r["vs_baseline"] = r["tok_per_s"] / baseline[r["seq"]]
    if rank != 0:
        return
    meta = dict(shape=args.shape, steps=args.steps, torch=torch.__version__, processes=world,
                sequence_parallel=n, baseline=reference,
                device=torch.cuda.get_device_name() if on_gpu else "cpu", date=time.strftime("%Y-%m-%d"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(meta, results=results), indent=2))

    print(f"\n{meta['device']} × {world}  shape={args.shape}  T={args.steps}  baseline={reference}  ({args.json})")
    print(f"{'seq':>6} {'variant':>10} {'tok/s/GPU':>10} {'MFU':>7} {'peak GiB':>9} {'× base':>7} {'a2a ms/step':>12}"
          f" {'a2a share':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['seq']:>6} {r['variant']:>10} {r['error']:>36}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "-"
        a2a = f"{1e3 * r['all_to_all_s_per_step']:,.1f}" if "all_to_all_s_per_step" in r else "-"
        share = f"{r['all_to_all_share']:.1%}" if "all_to_all_share" in r else "-"
        print(f"{r['seq']:>6} {r['variant']:>10} {r['tok_per_s']:>10,.0f} {mfu:>7} {peak:>9} {ratio:>7} {a2a:>12}"
              f" {share:>9}")


if __name__ == "__main__":
    main()
