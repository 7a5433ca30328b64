"""The DeepSpeed engine: its JSON config built from the recipe, the learning-rate schedule, and the
process group.

DeepSpeed owns the optimizer (torch's AdamW through its `torch_adam` path: fused CUDA kernels on GPU,
so no op is JIT-built and an image without nvcc trains; DeepSpeed's CPU Adam under offload), ZeRO
partitioning, gradient clipping and accumulation, stepping the schedule, and checkpoints. The schedule
itself is ours (a `LambdaLR` handed to DeepSpeed): DeepSpeed's `WarmupCosineLR` forces at least two
warmup steps and runs the first update at `warmup_min_ratio · lr`, which is 0 for a plain warmup.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist

from ouro_train.config import ConfigError, DeepSpeedConfig, OptimConfig
from ouro_train.model.sequence_parallel import SequenceParallel
from ouro_train.train.jit_ops import skip_shm_comm_op


def bf16_enabled(cfg: DeepSpeedConfig) -> bool:
    return torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16


def build_ds_config(
    ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int, grad_accum: int, world_size: int,
    load_universal: bool = False,
) -> dict:
    """`load_universal`: the engine will resume from a universal checkpoint (another topology's)."""
    on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=ds.overlap_comm and on_gpu, reduce_bucket_size=ds.reduce_bucket_size,
                    contiguous_gradients=True)
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16_enabled(ds)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                **optimizer_implementation(ds, on_gpu),
            },
        },
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**12,  # progress is ours
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def optimizer_implementation(ds: DeepSpeedConfig, on_gpu: bool) -> dict:
    """Which AdamW DeepSpeed builds: torch's (`torch_adam`), fused on GPU (one multi-tensor CUDA kernel
    shipped with torch, where DeepSpeed's FusedAdam would be compiled at start-up with nvcc and ninja).
    Under optimizer offload the states live on the CPU: DeepSpeed's CPU Adam."""
    if ds.offload_optimizer:
        return {}
    return {"torch_adam": True, "fused": True} if on_gpu else {"torch_adam": True}


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of `optim.lr` for the update with 0-based index s, over N = total_steps updates.

    Warm-up (W steps: warmup_steps, else round(warmup_ratio · N)): (s + 1) / W for s < W. After it, with
    m = min_lr_ratio and p = min(1, (s - W) / max(1, N - W)) the progress of the decay:
      cosine                m + (1 - m) · (1 + cos(pi · p)) / 2
      linear                m + (1 - m) · (1 - p)
      constant              1 (no warm-up: the config refuses one)
      constant_with_warmup  1
      wsd                   1 (stable) until the last D = max(1, round(decay_ratio · N)) updates (never
                            into the warm-up), then linear: m + (1 - m) · (1 - (s - (N - D)) / D)
    The decaying ones reach lr · m after the last update (at s = N), as LLaMA-Factory's (transformers')
    schedules reach 0 there; m = 0 is theirs."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_ratio * total_steps)
    decay_steps = max(1, total_steps - warmup)
    floor, kind = optim.min_lr_ratio, optim.schedule.value
    wsd_decay = max(1, min(round(optim.decay_ratio * total_steps), total_steps - warmup))

    def multiplier(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        if kind == "wsd":
            decayed = s - (total_steps - wsd_decay)
            return 1.0 if decayed <= 0 else floor + (1 - floor) * (1 - min(1.0, decayed / wsd_decay))
        progress = min(1.0, (s - warmup) / decay_steps)
        if kind == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def scheduler_factory(optim: OptimConfig, total_steps: int):
    """What `deepspeed.initialize(lr_scheduler=...)` calls with the optimizer it built."""
    multiplier = lr_lambda(optim, total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed. (A model built
    under ZeRO-3 holds empty partitions: its real shape is `ds_shape`.)"""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if _is_matrix(param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def loraplus_param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_ratio: float) -> list[dict]:
    """LoRA+ as peft's `create_loraplus_optimizer` splits it: the B matrices and the trained vectors at
    lr × lr_ratio, everything else at lr; weight decay on matrices only, as in `param_groups`. The
    schedule scales each group's own lr, so the ratio holds throughout. The first group is at lr (the
    rate the trainer logs)."""
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}  # (faster, decayed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            matrix = _is_matrix(param)
            groups[("lora_B" in name or not matrix, matrix)].append(param)
    return [{"params": params, "lr": lr * lr_ratio if faster else lr, "weight_decay": weight_decay if decayed else 0.0}
            for (faster, decayed), params in groups.items() if params]


def _is_matrix(param: torch.nn.Parameter) -> bool:
    # A ZeRO-3 partitioned parameter is an empty vector; its real shape is `ds_shape`.
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def init_distributed() -> tuple[int, int, int]:
    """Join (or, in a plain single process, create) the process group; returns (rank, local_rank, world)."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # a plain `ouro-train` process: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # DeepSpeed asks for it; nothing listens on it
        if not dist.is_initialized():
            # An in-process store: a port taken between choosing and binding it (EADDRINUSE) cannot happen.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        skip_shm_comm_op()  # a JIT-built op training never uses (see train/jit_ops.py)
        deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous we start ourselves)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_sequence_parallel(size: int, world_size: int, num_heads: int, num_kv_heads: int | None) -> None:
    """`parallel.sequence_parallel_size` against the number of processes and the model's heads: what
    the config alone cannot tell, checked before any data or weights are touched."""
    at = "parallel.sequence_parallel_size"
    if world_size % size:
        raise ConfigError(f"{at}: {size} does not divide the {world_size} processes (each group of {size} "
                          f"ranks shares one row; use a divisor of {world_size})")
    kv_heads = num_kv_heads or num_heads
    for what, heads in (("attention heads", num_heads), ("key-value heads", kv_heads)):
        if heads % size:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0]
            raise ConfigError(f"{at}: {size} does not divide the model's {heads} {what} (attention runs on "
                              f"heads/{size} per rank); choose one of {divisors}")


def sequence_parallel_group(size: int) -> SequenceParallel | None:
    """This rank's sequence-parallel group: consecutive ranks [g·size, (g+1)·size) (on one node when
    `size` divides the GPUs per node, where the all-to-all is fastest). Collective: every rank creates
    every group. None for `size` 1. The data-parallel rank of a process is then rank // size."""
    if size == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return SequenceParallel(mine, rank % size, size)
