"""Batch geometry: how a global batch splits into micro-batches, ranks and accumulation steps, and how
many optimizer steps a run makes. One function for the trainer and the compute plan, so a batch the
trainer would refuse is refused by `dry_run=true` too."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ouro_train.config import TrainConfig


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch_size: int  # sequences per rank per forward
    world_size: int  # data-parallel ranks
    grad_accum: int  # micro-batches per rank per optimizer step

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.world_size * self.grad_accum

    def steps_per_epoch(self, rows: int) -> int:
        """Optimizer steps in one pass over `rows` packed rows (the loader's epoch: each rank gets
        rows // world rows, in micro-batches; a last partial accumulation is not a step)."""
        micro_batches = -(-(rows // self.world_size) // self.micro_batch_size)
        return micro_batches // self.grad_accum


def batch_geometry(train: TrainConfig, max_seq_len: int, world_size: int) -> BatchGeometry:
    """From `train.global_batch_size` (sequences) or `train.global_batch_tokens` (packed rows of
    `max_seq_len` tokens); neither set: one micro-batch per rank per step."""
    per_pass = train.micro_batch_size * world_size  # sequences per micro-step over all ranks
    sequences = train.global_batch_size
    if train.global_batch_tokens is not None:
        sequences = train.global_batch_tokens // max_seq_len  # a multiple: checked with the config
    if sequences is None:
        return BatchGeometry(train.micro_batch_size, world_size, 1)
    if sequences % per_pass:
        raise ValueError(
            f"global batch of {sequences} sequences is not a multiple of train.micro_batch_size × world size = "
            f"{train.micro_batch_size} × {world_size}; nearest valid settings: "
            + nearest_valid_settings(train, max_seq_len, world_size, sequences)
        )
    return BatchGeometry(train.micro_batch_size, world_size, sequences // per_pass)


def nearest_valid_settings(train: TrainConfig, max_seq_len: int, world_size: int, sequences: int) -> str:
    """What would form a whole number of micro-batches per rank: the nearest global batches on this world
    size, the micro-batch sizes that split this global batch, and the nearest world sizes that do."""
    per_pass = train.micro_batch_size * world_size
    below, above = (sequences // per_pass) * per_pass, (sequences // per_pass + 1) * per_pass
    if train.global_batch_tokens is not None:
        batches = [f"train.global_batch_tokens={n * max_seq_len}" for n in (below, above) if n]
    else:
        batches = [f"train.global_batch_size={n}" for n in (below, above) if n]
    options = [" or ".join(batches) + f" on {world_size} processes"]
    micro = [m for m in range(1, sequences // world_size + 1) if sequences % (m * world_size) == 0]
    if micro:
        options.append(f"train.micro_batch_size={_nearest(micro, train.micro_batch_size)} on {world_size} processes")
    worlds = [w for w in range(1, sequences // train.micro_batch_size + 1) if sequences % (w * train.micro_batch_size) == 0]
    smaller = [w for w in worlds if w < world_size]
    larger = [w for w in worlds if w > world_size]
    nearest_worlds = ([max(smaller)] if smaller else []) + ([min(larger)] if larger else [])
    if nearest_worlds:
        options.append(" or ".join(map(str, nearest_worlds)) + " processes keeping this batch and micro-batch size")
    return "; ".join(options)


def _nearest(values: list[int], target: int) -> int:
    return min(values, key=lambda v: (abs(v - target), v))


def total_steps(max_steps: int | None, epochs: float, geometry: BatchGeometry, rows: int) -> int:
    """`max_steps` when set, else `epochs` passes over `rows` packed rows (at least one step)."""
    if max_steps is not None:
        return max_steps
    steps_per_epoch = geometry.steps_per_epoch(rows)
    if steps_per_epoch == 0:
        g = geometry
        raise ValueError(
            f"the training data is smaller than one optimizer step: {rows:,} packed row{'s' * (rows != 1)} for a "
            f"global batch of {g.sequences_per_step:,} sequences (train.micro_batch_size={g.micro_batch_size} × "
            f"{g.world_size} data-parallel ranks × {g.grad_accum} accumulation steps); add data, lower "
            "train.global_batch_size, or set max_steps to repeat the data")
    return max(1, math.floor(epochs * steps_per_epoch))
