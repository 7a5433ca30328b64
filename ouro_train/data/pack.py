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

from ouro_train.data.chat import ChatEncoder

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


def tokenize_batch(batch: dict, encoder: ChatEncoder, max_seq_len: int, truncate: bool, last_turn_only: bool) -> dict:
    """datasets `.map(batched=True)` function: messages -> input_ids, supervised, length, drop reason."""
    out: dict[str, list] = {name: [] for name in TOKENIZED}
    for ids, sup in encoder.encode_batch(batch["messages"], last_turn_only):
        if sup[0]:
            raise AssertionError("the first token of a document must not be supervised")
        drop, truncated = "", len(ids) > max_seq_len
        if truncated and not truncate:
            drop, ids, sup = "overlong", ids[:0], sup[:0]
        elif truncated:
            ids, sup = ids[:max_seq_len], sup[:max_seq_len]
            if not sup.any():
                drop, ids, sup = "no_supervised_tokens", ids[:0], sup[:0]
        out["input_ids"].append(ids)
        out["supervised"].append(sup)
        out["length"].append(len(ids))
        out["num_supervised"].append(int(sup.sum()))
        out["truncated"].append(truncated and not drop)
        out["drop"].append(drop)
    return out


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
