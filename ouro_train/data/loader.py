"""Feeding prepared rows to data-parallel ranks: a stateful sampler, collation, and a micro-batch loader.

Sampling. Each epoch visits the rows in the order `permutation(seed, epoch)` (or in stored order with
`shuffle=False`). The order is dealt out round-robin: step k gives rank r the row at position
`offset + r` and advances `offset` by `world_size`. So ranks never share a row within an epoch, and
the epoch ends when fewer than `world_size` rows are left: those last `num_rows % world_size` rows of
this epoch's order are dropped (every rank sees the same number of rows; the next epoch's order is a
new permutation, so no row is dropped every time). The state is `(epoch, offset)`, with `offset`
counted over all ranks, so a run resumes exactly where it stopped, even with another world size.

Collation. A micro-batch holds
  input_ids      [B, S] int64, pad id 0 after the last document
  labels         [B, S] int64, the token where supervised, else -100; aligned with input_ids (the model
                 shifts them, as for any HF causal LM)
  position_ids   [B, S] int64, restarting at 0 at every document; the padding tail is one more
                 "document" (positions 0, 1, ...), so document boundaries are where position_ids is 0
  attention_mask [B, S] int64 1/0 for unpacked rows; None for packed rows (boundaries come from
                 position_ids / cu_seq_lens)
  cu_seq_lens    [D + 1] int32, cumulative lengths of every document and padding tail over the
                 flattened micro-batch (the model's `cu_seq_lens`); max_seqlen, their longest
  num_supervised_tokens  number of targets the loss sees: (labels[:, 1:] != -100).sum(), to sum over
                 micro-batches and ranks and divide the summed loss by
  num_tokens     real (non-padding) tokens
Packed rows are padded to max_seq_len (fixed shapes); unpacked rows to the longest row of the
micro-batch, rounded up to `pad_to_multiple_of`.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ouro_train.data.cache import PreparedData
from ouro_train.model.loss import IGNORE_INDEX


class RowSampler:
    """Row indices for one data-parallel rank; iterating yields the rest of the current epoch."""

    def __init__(self, num_rows: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if num_rows < world_size:
            raise ValueError(f"{num_rows} rows cannot feed {world_size} ranks")
        self.num_rows, self.rank, self.world_size, self.seed, self.shuffle = num_rows, rank, world_size, seed, shuffle
        self.epoch = 0
        self.offset = 0  # rows of this epoch's order consumed by all ranks together

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def rows_per_epoch(self) -> int:
        """Rows each rank gets in a full epoch."""
        return self.num_rows // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.offset + self.world_size <= self.num_rows:
            row = int(order[self.offset + self.rank])
            self.offset += self.world_size
            yield row
        self.epoch += 1
        self.offset = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["num_rows"]) != (self.seed, self.num_rows):
            raise ValueError(
                f"sampler state is for seed {state['seed']} over {state['num_rows']} rows, "
                f"not seed {self.seed} over {self.num_rows}: resuming on other data"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def collate(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    packed: bool,
    seq_len: Optional[int] = None,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> dict:
    """Rows of (input_ids, supervised, document lengths) -> a micro-batch (see the module docstring)."""
    longest = max(len(ids) for ids, _, _ in rows)
    if seq_len is None:
        seq_len = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if longest > seq_len:
        raise ValueError(f"a row of {longest} tokens does not fit seq_len {seq_len}")
    batch = len(rows)
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    labels = np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((batch, seq_len), dtype=np.int64)
    segments: list[int] = []
    for b, (ids, sup, doc_lengths) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = ids
        labels[b, :n] = np.where(sup, ids, IGNORE_INDEX)
        lengths = [int(x) for x in doc_lengths] + ([seq_len - n] if n < seq_len else [])
        position_ids[b] = np.concatenate([np.arange(length) for length in lengths])
        segments += lengths
    cu_seq_lens = np.zeros(len(segments) + 1, dtype=np.int32)
    np.cumsum(segments, out=cu_seq_lens[1:])
    attention_mask = None if packed else (np.arange(seq_len)[None, :] < np.array([[len(r[0])] for r in rows]))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "attention_mask": None if attention_mask is None else torch.from_numpy(attention_mask.astype(np.int64)),
        "cu_seq_lens": torch.from_numpy(cu_seq_lens),
        "max_seqlen": max(segments),
        "num_supervised_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_tokens": int(sum(len(r[0]) for r in rows)),
    }


class MicroBatchLoader:
    """Micro-batches of one rank's rows; iterating yields the rest of the current epoch.

    The last micro-batch of an epoch may be smaller. `state_dict()` taken after any micro-batch
    resumes, in a fresh loader, with exactly the micro-batches that would have come next.
    """

    def __init__(
        self,
        data: PreparedData,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_to_multiple_of: int = 8,
    ):
        self.data, self.micro_batch_size, self.pad_to_multiple_of = data, micro_batch_size, pad_to_multiple_of
        self.sampler = RowSampler(len(data), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        """Micro-batches in a full epoch."""
        return -(-self.sampler.rows_per_epoch() // self.micro_batch_size)

    def __iter__(self) -> Iterator[dict]:
        rows = []
        for i in self.sampler:
            rows.append(self.data[i])
            if len(rows) == self.micro_batch_size:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)

    def _collate(self, rows) -> dict:
        seq_len = self.data.max_seq_len if self.data.packed else None
        return collate(rows, packed=self.data.packed, seq_len=seq_len, pad_to_multiple_of=self.pad_to_multiple_of)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
