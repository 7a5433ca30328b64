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
            f"{train.micro_batch_size} × {world_size}"
        )
    return BatchGeometry(train.micro_batch_size, world_size, sequences // per_pass)


def total_steps(max_steps: int | None, epochs: float, steps_per_epoch: int) -> int:
    """`max_steps` when set, else `epochs` passes (at least one step)."""
    if max_steps is not None:
        return max_steps
    if steps_per_epoch == 0:
        raise ValueError("the training data is smaller than one optimizer step (fewer packed rows than a global batch)")
    return max(1, math.floor(epochs * steps_per_epoch))
