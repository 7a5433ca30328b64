"""Tokenization of validated conversations, and best-fit packing of them into rows.

A conversation ("document") is never split across rows. One longer than `max_seq_len` is dropped
(`overlong: drop`) or cut to `max_seq_len` (`overlong: truncate`); a cut document with no supervised
token left is dropped. Every document starts with `<|im_start|>` of its system turn, which is never
supervised: since the model shifts labels by one, that is what keeps the first token of a document
from being a target predicted from the previous document in the same packed row (checked here).

Packing is best-fit decreasing: documents longest first, each into the open row with the least room
that still fits it, else a new row. Open rows are kept by remaining room in a sorted list of distinct
room values (at most `max_seq_len` of them), so each placement is a binary search: O(n log S).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa

from ouro_train.data.chat import ChatEncoder, Supervision

DROP_REASONS = ("overlong", "no_supervised_tokens")
TOKENIZED = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "supervised": datasets.List(datasets.Value("bool")),
        "length": datasets.Value("int32"),
        "num_supervised": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "drop": datasets.Value("string"),  # "" or one of DROP_REASONS
    }
)


def tokenize_batch(batch: dict, encoder: ChatEncoder, max_seq_len: int, truncate: bool,
                   supervision: Supervision) -> pa.Table:
    """datasets `.map(batched=True)` function: messages -> input_ids, supervised, length, drop reason.
    The batch's tokens stay in flat arrays and become one Arrow table (list columns from offsets):
    nothing per token or per document goes through Python objects."""
    ids, sup, lengths = encoder.encode_flat(batch["messages"], supervision=supervision)
    n = len(lengths)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if n and sup[starts[:-1]].any():
        raise AssertionError("the first token of a document must not be supervised")
    sup_before = np.zeros(len(sup) + 1, dtype=np.int64)  # supervised tokens before each position
    np.cumsum(sup, out=sup_before[1:])
    overlong = lengths > max_seq_len
    keep = np.minimum(lengths, max_seq_len) if truncate else np.where(overlong, 0, lengths)
    num_supervised = sup_before[starts[:-1] + keep] - sup_before[starts[:-1]]
    drop = np.full(n, "", dtype=object)
    if truncate:
        empty = overlong & (num_supervised == 0)  # cut to no supervised token: nothing to learn from
        drop[empty], keep[empty] = "no_supervised_tokens", 0
    else:
        drop[overlong] = "overlong"
    if (keep != lengths).any():  # keep the first keep[d] tokens of each document d
        position = np.arange(len(ids)) - np.repeat(starts[:-1], lengths)
        kept = position < np.repeat(keep, lengths)
        ids, sup = ids[kept], sup[kept]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(keep, out=offsets[1:])
    columns = {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int32())),
        "supervised": pa.ListArray.from_arrays(pa.array(offsets), pa.array(sup, pa.bool_())),
        "length": pa.array(keep.astype(np.int32)),
        "num_supervised": pa.array(num_supervised.astype(np.int32)),
        "truncated": pa.array(overlong & (drop == "") if truncate else np.zeros(n, dtype=bool)),
        "drop": pa.array(drop.tolist(), pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=TOKENIZED.arrow_schema)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of indices into `lengths`, each row's lengths summing to at most `capacity`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must be in [1, {capacity}]")
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct room values that some open row has
    rows_with_room: dict[int, list[int]] = {}  # room -> open rows with exactly that room
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):
            room = rooms[at]
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                del rows_with_room[room], rooms[at]
            rows[row].append(i)
        else:
            room, row = capacity, len(rows)
            rows.append([i])
        left = room - n
        if left > 0:
            if left not in rows_with_room:
                rows_with_room[left] = []
                bisect.insort(rooms, left)
            rows_with_room[left].append(row)
    return rows
