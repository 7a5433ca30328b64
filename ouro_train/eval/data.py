"""Held-out chat data for evaluation: jsonl rows -> conversations -> padded batches with assistant labels.

Rows are read and validated by the data pipeline (OpenAI `messages`, ShareGPT, prompt/response,
alpaca; `<think>` blocks split into reasoning) and rendered by its `ChatEncoder`, so the supervised
tokens are exactly those training supervises.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ouro_train.config import DataConfig, OnBadRow, SourceConfig
from ouro_train.data.chat import ChatEncoder
from ouro_train.data.loader import collate
from ouro_train.data.pipeline import check_sources
from ouro_train.data.validate import DataError


def read_conversations(path: str | Path, max_samples: int | None = None) -> list[list[dict]]:
    """The first `max_samples` conversations of a file, read and validated by the data pipeline
    (any format and file type it reads); the first bad row raises DataError with its file:line."""
    path = Path(path)
    data = DataConfig(on_bad_row=OnBadRow.error)
    with tempfile.TemporaryDirectory(prefix="ouro-eval-") as work:
        (checked,) = check_sources(data, [SourceConfig(name=path.stem, path=str(path))], Path(work))
        conversations = checked.rows.select(checked.valid[:max_samples])["messages"]
    if not conversations:
        raise DataError(f"{path} holds no conversations")
    return conversations


def loss_batches(
    conversations: Sequence[Sequence[dict]], tokenizer, batch_size: int, pad_id: int, max_seq_len: int | None = None
) -> Iterator[dict]:
    """Right-padded batches (`input_ids`, `labels`, `attention_mask`, `position_ids`) in the data order;
    conversations longer than `max_seq_len` are cut there."""
    encoded = ChatEncoder(tokenizer).encode_batch(conversations)
    for start in range(0, len(encoded), batch_size):
        rows = []
        for ids, supervised in encoded[start : start + batch_size]:
            ids, supervised = ids[:max_seq_len], supervised[:max_seq_len]
            rows.append((ids, supervised, np.array([len(ids)])))
        yield collate(rows, packed=False, pad_id=pad_id)
