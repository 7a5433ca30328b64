"""What the benchmarks share: model shapes, the packed input row, one measurement row's settings, the
memory the process holds, and the bf16 matmul peak measured on the device."""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import torch

from ouro_train.model import OuroConfig

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 head_dim=32),
    "1.4b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, head_dim=128),
}


def bench_config(shape: str, steps: int, seq: int) -> OuroConfig:
    return OuroConfig(**SHAPES[shape], num_key_value_heads=None, total_ut_steps=steps,
                      max_position_embeddings=max(seq, 4096), pad_token_id=0)


def packed_row(seq: int, vocab: int, gen: torch.Generator):
    """One row of documents of 1/8..1/2 of the row each: (ids, position ids, labels), every token
    supervised except document starts."""
    lengths, left = [], seq
    while left:
        n = min(left, int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    ids = torch.randint(17, vocab, (1, seq), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions, ids.masked_fill(positions == 0, -100)


# The upstream remote code a baseline row can load (OURO_UPSTREAM_CODE=DIR); never part of the project.
UPSTREAM_ENV = "OURO_UPSTREAM_CODE"
UPSTREAM_FILES = ("configuration_ouro.py", "modeling_ouro.py")


def missing_upstream_files(directory: str) -> list[str]:
    return [name for name in UPSTREAM_FILES if not directory or not (Path(directory) / name).is_file()]


@dataclasses.dataclass
class Row:
    """One training-step measurement. `model`: ours | baseline (our model with upstream's settings:
    SDPA causal over the row, upstream's `labels=` loss) | upstream (the upstream remote code from
    OURO_UPSTREAM_CODE). `checkpointing` and `compile` pass through unchanged to the model, so a new
    policy needs no change here. `inject` (fail | hang) tests the check itself."""

    name: str
    model: str = "ours"
    seq: int = 8192
    lora: bool = False
    checkpointing: str = "layer"
    compile: bool = False
    shape: str = "1.4b"
    steps: int = 4  # recurrent steps T
    warmup: int = 1
    iters: int = 2
    inject: str | None = None


def live_tensor_gib(device: torch.device) -> float:
    """Memory held by live tensors: the CUDA allocator's count, or on the CPU the storages of every
    tensor the garbage collector can reach (what an engine that was not destroyed keeps alive)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device) / 2**30
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no proxy __class__ lookups
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # compile's fake tensors hold no memory
                continue
            if pointer not in seen:
                seen.add(pointer)
                total += storage.nbytes()
    return total / 2**30


def matmul_peak_flops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The best bf16 matmul FLOP/s of n×n×n products on this device (float32 on the CPU, which has no
    fast bf16 path everywhere): the attainable peak MFU is also quoted against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    best = float("inf")
    for _ in range(3):  # the first round warms up clocks and the library's kernel choice
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
