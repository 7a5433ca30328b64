"""Helpers shared by the data tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from conftest import shared_path  # noqa: E402  (the repository's tests/conftest.py)

from ouro_train.config import DataConfig, SourceConfig  # noqa: E402
from ouro_train.data.tokenizer import project_tokenizer  # noqa: E402


@functools.lru_cache(maxsize=None)
def project_tok():
    """The project tokenizer, built once per test session in a temporary directory."""
    return project_tokenizer(tempfile.mkdtemp(prefix="ouro-test-tok-"))


def ouro_tok():
    """Ouro-1.4B's real tokenizer from ../shared (the test is skipped where it is absent)."""
    return _ouro_tok(str(shared_path("ouro-1.4b-files")))


@functools.lru_cache(maxsize=None)
def _ouro_tok(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON Lines; a `bytes` or `str` row is written as that raw line."""
    with open(path, "wb") as f:
        for row in rows:
            line = row if isinstance(row, bytes) else row.encode() if isinstance(row, str) else json.dumps(row).encode()
            f.write(line + b"\n")
    return path


def chat(user: str = "What is 2+2?", answer: str = "4", reasoning=None) -> dict:
    assistant = {"role": "assistant", "content": answer}
    if reasoning is not None:
        assistant["reasoning"] = reasoning
    return {"messages": [{"role": "user", "content": user}, assistant]}


GOOD_ROW = chat()


def data_config(tmp_path: Path, sources: list[SourceConfig], **overrides) -> DataConfig:
    return DataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **overrides)


def source(name: str, path: Path, **kw) -> SourceConfig:
    return SourceConfig(name=name, path=str(path), **kw)
