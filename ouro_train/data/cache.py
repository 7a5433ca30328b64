"""The prepared-data cache: one directory per (split, config, tokenizer, code version).

    {cache_dir}/{split}-{key}/
        manifest.json     counts per source and domain, skips by reason, packing efficiency, ...
        bad_rows.jsonl    under on_bad_row=skip: the first bad rows of each source (source, location, reason, error)
        tokens.npy        every kept document's ids, concatenated (uint16, or uint32 for vocabularies > 65536)
        supervised.npy    bool, aligned with tokens: the label is the token itself, else -100
        doc_offsets.npy   int64 [documents + 1]: document d is tokens[doc_offsets[d]:doc_offsets[d + 1]]
        row_docs.npy      int64: the documents of each row, row after row (a document drawn twice is stored once)
        row_offsets.npy   int64 [rows + 1]: row r holds documents row_docs[row_offsets[r]:row_offsets[r + 1]]

`key` hashes everything the content depends on: the split's sources (with each local file's size and
modification time), the data settings that change tokens or rows, the tokenizer hash, and
`FORMAT_VERSION`. Settings that do not (num_proc, cache_dir) are left out. A directory is written under
a temporary name and renamed into place when complete, so an interrupted prepare never leaves a
directory that looks finished; arrays are read back memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ouro_train.config import DataConfig, SourceConfig
from ouro_train.data.sources import local_files

FORMAT_VERSION = 2  # bump when anything changes what a cache directory contains
ARRAYS = ("tokens", "supervised", "doc_offsets", "row_docs", "row_offsets")


def cache_key(split: str, sources: Sequence[SourceConfig], data: DataConfig, tokenizer_hash: str) -> str:
    settings = {
        k: getattr(data, k)
        for k in ("max_seq_len", "pack", "on_bad_row", "max_bad_fraction", "allow_empty_answer", "overlong",
                  "last_turn_only", "train_on_prompt", "mask_turn_end", "shuffle", "val_size", "mix_size", "seed")
    }
    spec = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "sources": [{**dataclasses.asdict(s), "files": _file_stamps(s)} for s in sources],
        "settings": settings,
        "tokenizer": tokenizer_hash,
    }
    blob = json.dumps(spec, sort_keys=True, default=lambda v: v.value if isinstance(v, Enum) else str(v))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _file_stamps(src: SourceConfig) -> list:
    if src.path is None:
        return []
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in local_files(src)]


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target`, renamed to `target` if the block completes (removed if not).
    If another process created `target` meanwhile, theirs is kept."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PreparedData:
    """A finished cache directory: rows of packed (or single) documents, read memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        for name in ARRAYS:
            setattr(self, name, np.load(self.path / f"{name}.npy", mmap_mode="r"))
        self.packed: bool = self.manifest["pack"]
        self.max_seq_len: int = self.manifest["max_seq_len"]

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int64, supervised bool, document lengths) of one row."""
        docs = self.row_docs[self.row_offsets[row] : self.row_offsets[row + 1]]
        starts, ends = self.doc_offsets[docs], self.doc_offsets[docs + 1]
        ids = np.concatenate([self.tokens[s:e] for s, e in zip(starts, ends)]).astype(np.int64)
        sup = np.concatenate([self.supervised[s:e] for s, e in zip(starts, ends)])
        return ids, sup, (ends - starts).astype(np.int64)


def content_sha256(directory: Path) -> str:
    """SHA-256 of a cache directory's arrays: the rows' tokens, supervision and packing, whatever the key."""
    digest = hashlib.sha256()
    for name in ARRAYS:
        with open(Path(directory) / f"{name}.npy", "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def new_array(directory: Path, name: str, dtype, length: int) -> np.ndarray:
    """A writable memory-mapped .npy file of `length` elements (filled by the caller, flushed on close)."""
    return np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=(length,))


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
