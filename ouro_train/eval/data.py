"""Held-out chat data for evaluation: jsonl rows -> conversations -> padded batches with assistant labels.

Rows are read by the data pipeline's format adapters (OpenAI `messages`, ShareGPT, prompt/response,
alpaca; `<think>` blocks split into reasoning) and rendered by its `ChatEncoder`, so the supervised
tokens are exactly those training supervises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ouro_train.config import SourceConfig
from ouro_train.data.chat import ChatEncoder
from ouro_train.data.formats import detect_format, to_conversation
from ouro_train.data.loader import collate
from ouro_train.data.validate import BadRow, DataError


def read_conversations(path: str | Path, max_samples: int | None = None) -> list[list[dict]]:
    """The first `max_samples` conversations of a jsonl file."""
    path = Path(path)
    source = SourceConfig(name=path.stem)
    conversations: list[list[dict]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if max_samples is not None and len(conversations) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise BadRow("bad_type", f"expected a JSON object, got {type(row).__name__}")
                conversations.append(to_conversation(row, detect_format(row.keys(), source.name), source))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e})") from None
            except BadRow as e:
                raise DataError(e.message(source.name, f"{path}:{number}")) from None
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
