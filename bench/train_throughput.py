"""Training-step throughput of `ouro-train`'s step against a plain baseline, in one run.

    python bench/train_throughput.py                          # CUDA: Ouro-1.4B shapes, 4K..32K, bf16
    python bench/train_throughput.py --shape tiny --seq 256 512   # CPU check that every variant runs

Each row runs the real step: a DeepSpeed engine (ZeRO-2, AdamW, bf16 on CUDA) over the model,
forward + loss + backward + optimizer step, micro-batch 1, on a packed row of documents.
  baseline  our model with upstream's settings: per-layer checkpointing, SDPA causal over the whole row,
            upstream's loss (CE of the pdf-weighted mixture of T full [S, V] logits: `model(labels=...)`)
  upstream  the upstream remote code itself (OURO_UPSTREAM_CODE=DIR holding its modeling_ouro.py and
            configuration_ouro.py), called as the baseline is
  ours      our objective (chunked, fused expected_logits), packed-document attention (FlexAttention
            on CUDA), checkpointing `layer` up to 8K and `step+layer` beyond
  ours_lora the same with LoRA r=16 on every linear projection
  ours_sp   `ours` under Ulysses sequence parallelism (`--sequence-parallel N`, launched on a multiple of
            N processes): each group of N ranks shares one row, S/N tokens per rank; its baseline in
            the same run is `ours`, every rank training on a whole row of its own
Prints tok/s (per GPU: tokens of the rows trained ÷ time ÷ GPUs), MFU (FLOPs per token and the device's
bf16 peak from `ouro_train.model.flops`), peak GiB, the ratio to the baseline and, for ours_sp, the
time per step spent in the all-to-alls (forward, backward and recomputation); writes JSON (`--json`).
Each engine is destroyed after its row and the memory it held must come back (checked, else an error).

    torchrun --nproc_per_node 2 bench/train_throughput.py --sequence-parallel 2 --seq 256 512   # CPU (gloo)
    torchrun --nproc_per_node 8 bench/train_throughput.py --sequence-parallel 4 --seq 32768 65536

`bench/gpu_check.py` runs one `Row` per process through `run_row`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import resource
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from common import (
    SHAPES,
    UPSTREAM_ENV,
    UPSTREAM_FILES,
    Row,
    bench_config,
    live_tensor_gib,
    missing_upstream_files,
    packed_row,
    sync,
)
from ouro_train.config import DeepSpeedConfig, LoraConfig, ObjectiveConfig, OptimConfig
from ouro_train.model import OuroForCausalLM
from ouro_train.model.flops import model_flops_utilization, training_flops_per_token
from ouro_train.model.sequence_parallel import AllToAllTimer
from ouro_train.train import trainable
from ouro_train.train.engine import build_ds_config, init_distributed, param_groups, sequence_parallel_group

VARIANTS = ("baseline", "ours", "ours_lora", "ours_sp")
# Memory an engine may leave behind after its row (allocator rounding, caches of a few kernels).
RELEASE_SLACK_GIB = 0.05

LossFn = Callable[..., torch.Tensor]  # (engine, ids, positions, labels) -> loss


def default_checkpointing(seq: int) -> str:
    return "layer" if seq <= 8192 else "step+layer"


# ------------------------------------------------------------------ what trains (one place per model)
def ours_model_and_loss(row: Row, config, sp=None) -> tuple[torch.nn.Module, LossFn]:
    """Our model as `ouro-train` builds it and its forward + objective on a packed micro-batch: the
    trainer's own code (train/trainable.py), with the row's checkpointing, compile and LoRA."""
    objective = ObjectiveConfig()
    lora = LoraConfig(enabled=row.lora, r=16, alpha=32, dropout=0.0)
    model = trainable.make_trainable(OuroForCausalLM(config), row.checkpointing, lora, objective, compile=row.compile)

    def loss(engine, ids, positions, labels):
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        obj = trainable.micro_batch_objective(engine, engine.module.get_output_embeddings(), batch, objective,
                                              ids.device, sequence_parallel=sp, step_losses=False)
        return obj.loss_sum / obj.num_tokens.clamp_min(1)

    return model, loss


def baseline_model_and_loss(row: Row, config, sp=None) -> tuple[torch.nn.Module, LossFn]:
    """Our model run as upstream's is: no document boundaries, upstream's `labels=` loss."""
    model = OuroForCausalLM(config)
    model.set_activation_checkpointing(row.checkpointing)
    if row.compile:
        model.compile_layers()
    return model, upstream_style_loss


def upstream_model_and_loss(row: Row, config, sp=None) -> tuple[torch.nn.Module, LossFn]:
    """The upstream remote code's model from OURO_UPSTREAM_CODE, with transformers' per-layer
    gradient checkpointing (the only policy it has), called as the baseline is."""
    if row.checkpointing not in ("none", "layer"):
        raise ValueError(f"upstream code checkpoints per layer or not at all, not {row.checkpointing!r}")
    config_class, model_class = load_upstream(os.environ.get(UPSTREAM_ENV, ""))
    upstream_config = config_class(**config.to_dict())  # our JSON layout is upstream's
    upstream_config._attn_implementation = "sdpa"
    model = model_class(upstream_config)
    if row.checkpointing == "layer":
        model.gradient_checkpointing_enable()
    if row.compile:
        model.compile()
    return model, upstream_style_loss


def upstream_style_loss(engine, ids, positions, labels):
    return engine(ids, labels=labels, use_cache=False).loss


MODELS = {"ours": ours_model_and_loss, "baseline": baseline_model_and_loss, "upstream": upstream_model_and_loss}


def load_upstream(directory: str):
    """(config class, causal-LM class) of the upstream remote code in `directory` (its
    configuration_ouro.py and modeling_ouro.py, imported as one package so their relative imports
    resolve): the config class defined there whose model_type is `ouro`, and the causal-LM class
    defined there on it."""
    path = Path(directory)
    if missing := missing_upstream_files(directory):
        raise FileNotFoundError(f"{UPSTREAM_ENV}={directory!r}: needs the upstream remote-code files "
                                f"{' and '.join(UPSTREAM_FILES)} (missing: {', '.join(missing)})")
    package = "ouro_upstream_code"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(path.resolve())]
        sys.modules[package] = module
    configs = importlib.import_module(f"{package}.configuration_ouro")
    models = importlib.import_module(f"{package}.modeling_ouro")
    defined = lambda module: [c for c in vars(module).values()  # noqa: E731 (not what it imports)
                              if isinstance(c, type) and c.__module__ == module.__name__]
    config_class = next((c for c in defined(configs) if getattr(c, "model_type", None) == "ouro"), None)
    model_class = next((c for c in defined(models) if c.__name__.endswith("ForCausalLM")
                        and getattr(c, "config_class", None) is config_class), None)
    if config_class is None or model_class is None:
        raise ImportError(f"{UPSTREAM_ENV}={directory}: no config class with model_type 'ouro' and causal-LM "
                          f"class built on it in configuration_ouro.py / modeling_ouro.py")
    return config_class, model_class


# ------------------------------------------------------------------------------------ one row
def run_row(row: Row, phase: Callable[[str], None] = lambda name: None, sp=None) -> dict:
    """Build the engine, train `warmup + iters` steps, destroy the engine and check its memory came back.
    `phase(name)` is told each phase as it starts (start, build, step, release), so a row that dies
    says where. tok/s is per GPU (under sequence parallelism, S / N tokens per rank)."""
    phase("start")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed()
    result: dict = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        torch=torch.__version__)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        result["device_used_gib_at_start"] = (total - free) / 2**30  # every process's, this context's included
    before = live_tensor_gib(device)

    phase("build")
    import deepspeed

    config = bench_config(row.shape, row.steps, row.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model, loss_fn = MODELS[row.model](row, config, sp)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(lr=1e-5), micro_batch=1, grad_accum=1,
                         world_size=dist.get_world_size())
    engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    result.update(used_settings(engine.module, optimizer))
    batch = [t.to(device) for t in packed_row(row.seq, config.vocab_size, torch.Generator().manual_seed(row.seq))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    phase("step")
    times, losses, a2a = [], [], []
    for i in range(row.warmup + row.iters):
        if row.inject == "fail":
            raise RuntimeError(f"injected failure in row {row.name}")
        while row.inject == "hang":
            time.sleep(1)
        if sp is not None:
            sp.timer.reset()
        dist.barrier()
        start = time.perf_counter()
        loss = loss_fn(engine, *batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        sync(device)
        times.append(time.perf_counter() - start)
        if sp is not None:
            a2a.append(sp.timer.seconds)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss {losses[-1]} at step {i} of row {row.name}")
    del loss
    measured = times[row.warmup:] or times
    step_s = sorted(measured)[len(measured) // 2]
    gpus_per_row = sp.size if sp is not None else 1
    result.update(first_step_s=times[0], step_s=step_s, tok_per_s=row.seq / gpus_per_row / step_s,
                  first_loss=losses[0], last_loss=losses[-1],
                  flops_per_token=training_flops_per_token(config, row.seq))
    if sp is not None:
        a2a = a2a[row.warmup:] or a2a
        result.update(sequence_parallel=sp.size, all_to_all_s_per_step=sorted(a2a)[len(a2a) // 2],
                      all_to_all_calls_per_step=sp.timer.calls)
        result["all_to_all_share"] = result["all_to_all_s_per_step"] / step_s
    if device.type == "cuda":
        result.update(mfu=model_flops_utilization(result["tok_per_s"], config, row.seq, result["device"]),
                      peak_alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    else:  # the process's own peak (all earlier rows of this process included)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    phase("release")
    # `del` alone frees nothing: DeepSpeed's engine and optimizer keep the parameters referenced.
    engine.destroy()
    del engine, optimizer, model, loss_fn, batch
    if row.compile:  # compiled code may keep the layers' tensors referenced
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    after = live_tensor_gib(device)
    result.update(live_gib_before=before, live_gib_after=after)
    if after > before + RELEASE_SLACK_GIB:
        raise MemoryError(f"row {row.name}: {after - before:.2f} GiB still held after the engine was destroyed")
    return result


def used_settings(module: torch.nn.Module, optimizer) -> dict:
    """What the engine actually runs: checkpointing policy, whether the layers are compiled, attention
    implementation and the optimizer class DeepSpeed built."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    inner = getattr(base, "model", base)
    checkpointing = getattr(inner, "activation_checkpointing", None)
    if checkpointing is None:  # transformers' own flag (upstream code)
        checkpointing = "layer" if getattr(base, "is_gradient_checkpointing", False) else "none"
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
    basic = getattr(optimizer, "optimizer", optimizer)
    fused = getattr(basic, "defaults", {}).get("fused")
    return dict(model_class=f"{type(base).__module__}.{type(base).__name__}", checkpointing_used=checkpointing,
                compile_used=compiled,
                attention=getattr(base.config, "_attn_implementation", None),
                optimizer=type(basic).__name__ + ("(fused)" if fused else ""))


# ------------------------------------------------------------------------------- the CLI's rows
def variant_row(variant: str, seq: int, args) -> Row:
    common = dict(seq=seq, shape=args.shape, steps=args.steps, warmup=args.warmup, iters=args.iters)
    if variant == "baseline":
        return Row(f"{variant}-{seq}", model="baseline", checkpointing="layer", **common)
    return Row(f"{variant}-{seq}", model="ours", lora=variant == "ours_lora", checkpointing=default_checkpointing(seq),
               **common)


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
    sp = None
    if n > 1:
        if world % n:
            p.error(f"--sequence-parallel {n} needs a multiple of {n} processes (torchrun --nproc_per_node), got {world}")
        sp = dataclasses.replace(sequence_parallel_group(n), timer=AllToAllTimer())
    elif args.variants and "ours_sp" in args.variants:
        p.error("ours_sp needs --sequence-parallel N (N > 1)")
    args.variants = args.variants or (["ours", "ours_sp"] if n > 1 else ["baseline", "ours", "ours_lora"])
    reference = "ours" if n > 1 else "baseline"

    results = []
    for seq in args.seq:
        for v in args.variants:
            if v == "ours_lora" and args.lora_seq is not None and seq not in args.lora_seq:
                continue
            row = variant_row(v, seq, args)
            result = dict(variant=v, seq=seq, checkpointing=row.checkpointing)
            try:
                result.update(run_row(row, sp=sp if v == "ours_sp" else None))
            except torch.OutOfMemoryError:
                result["error"] = "out of memory"
            results.append(result)
            if on_gpu:
                torch.cuda.empty_cache()
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
        peak = f"{r['peak_alloc_gib']:.1f}" if "peak_alloc_gib" in r else "-"
        ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "-"
        a2a = f"{1e3 * r['all_to_all_s_per_step']:,.1f}" if "all_to_all_s_per_step" in r else "-"
        share = f"{r['all_to_all_share']:.1%}" if "all_to_all_share" in r else "-"
        print(f"{r['seq']:>6} {r['variant']:>10} {r['tok_per_s']:>10,.0f} {mfu:>7} {peak:>9} {ratio:>7} {a2a:>12}"
              f" {share:>9}")


if __name__ == "__main__":
    main()
