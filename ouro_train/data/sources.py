"""Load a source into a `datasets.Dataset` of validated conversations, one row per source row.

Every source, whatever its format, becomes the columns of `FEATURES`:
  `messages` [{role, content, reasoning}], `reason` ("" for a good row, else a reason from
  `validate.BAD_ROW_REASONS`, or "filtered" for a row the source's `where` leaves out), and `error`
  (the bad row's one-line message, naming source, location and field).

Local JSON Lines are read line by line by our own generator rather than datasets' json builder:
that builder loses line numbers and fails a whole file on one malformed line, while a bad row must be
reported (or skipped) as `file:line`. Large files are split at line boundaries so `num_proc`
processes share them. Parquet files and hub datasets go through `load_dataset` and are checked with
`.map(num_proc=...)`; their rows are located by 0-based row index.

`read_records` reads the same files and hub datasets as raw rows with those locations, for tables
that are not conversations (evaluation benchmarks, prediction files).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterator

import datasets

from ouro_train.config import Format, SourceConfig
from ouro_train.data.formats import detect_format, to_conversation
from ouro_train.data.validate import BadRow, DataError

FEATURES = datasets.Features(
    {
        "messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string"), "reasoning": datasets.Value("string")}
        ),
        "reason": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)
JSONL_SHARD_BYTES = 64 << 20


def local_files(src: SourceConfig) -> list[Path]:
    """The files a local source names (a path or a glob), sorted; DataError if there are none."""
    matches = sorted(Path(p) for p in glob.glob(str(Path(src.path).expanduser())))
    if not matches:
        raise DataError(f"source '{src.name}': no file matches path {src.path}")
    return matches


def load_source(src: SourceConfig, work_dir: Path, num_proc: int = 1) -> datasets.Dataset:
    """All rows of `src`, validated, with intermediate Arrow files under `work_dir`."""
    if (src.path is None) == (src.hf_id is None):
        raise DataError(f"source '{src.name}': set exactly one of `path` and `hf_id`")
    work_dir.mkdir(parents=True, exist_ok=True)
    if src.hf_id is not None:
        ds = datasets.load_dataset(src.hf_id, src.hf_name, split=src.split, revision=src.revision)
        label = src.hf_id + (f"/{src.hf_name}" if src.hf_name else "") + f"[{src.split}]"
        return _check_table(ds, src, label, work_dir / "hub", num_proc)
    parts = []
    for i, path in enumerate(local_files(src)):
        if path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work_dir / "hf"))
            parts.append(_check_table(ds, src, str(path), work_dir / f"{i}", num_proc))
        elif path.suffix in (".jsonl", ".json"):
            parts.append(_read_jsonl(path, src, work_dir / f"{i}", num_proc))
        else:
            raise DataError(f"source '{src.name}': unsupported file type {path} (use .jsonl/.json or .parquet)")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_records(src: SourceConfig, work_dir: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of `src`, for tables that are not conversations (benchmarks,
    predictions): located as `file:line` for JSON Lines, `row N` for Parquet and hub datasets. A line
    that is not valid JSON raises DataError naming it."""
    if (src.path is None) == (src.hf_id is None):
        raise DataError(f"source '{src.name}': set exactly one of `path` and `hf_id`")
    if src.hf_id is not None:
        ds = datasets.load_dataset(src.hf_id, src.hf_name, split=src.split, revision=src.revision)
        label = src.hf_id + (f"/{src.hf_name}" if src.hf_name else "") + f"[{src.split}]"
        yield from ((f"{label} row {i}", row) for i, row in enumerate(ds))
        return
    for path in local_files(src):
        if path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work_dir / "hf"))
            yield from ((f"{path} row {i}", row) for i, row in enumerate(ds))
        elif path.suffix in (".jsonl", ".json"):
            with open(path, "rb") as f:
                for line, raw in enumerate(f, start=1):
                    if raw.strip():
                        try:
                            yield f"{path}:{line}", _parse_line(raw)
                        except BadRow as bad:
                            raise DataError(bad.message(src.name, f"{path}:{line}")) from None
        else:
            raise DataError(f"source '{src.name}': unsupported file type {path} (use .jsonl/.json or .parquet)")


# ---- parquet and hub datasets -------------------------------------------------------------------


def _check_table(ds: datasets.Dataset, src: SourceConfig, label: str, work: Path, num_proc: int) -> datasets.Dataset:
    fmt = detect_format(ds.column_names, src.name) if src.format == Format.auto else src.format
    work.mkdir(parents=True, exist_ok=True)
    return ds.map(
        _check_batch,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=FEATURES,
        fn_kwargs={"src": src, "fmt": fmt, "label": label},
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(work / "checked.arrow"),
        desc=f"checking {src.name}",
    )


def _check_batch(batch: dict, indices: list[int], src: SourceConfig, fmt: Format, label: str) -> dict:
    keys = list(batch)
    rows = [_check_row({k: batch[k][j] for k in keys}, src, fmt, f"{label} row {idx}") for j, idx in enumerate(indices)]
    return {name: [r[name] for r in rows] for name in FEATURES}


def _check_row(row, src: SourceConfig, fmt: Format, location: str) -> dict:
    if isinstance(row, dict) and any(row.get(k) != v for k, v in src.where.items()):
        return {"messages": [], "reason": "filtered", "error": ""}
    try:
        return {"messages": to_conversation(row, fmt, src), "reason": "", "error": ""}
    except BadRow as bad:
        return _bad(bad, src, location)


def _bad(bad: BadRow, src: SourceConfig, location: str) -> dict:
    return {"messages": [], "reason": bad.reason, "error": bad.message(src.name, location)}


# ---- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(path: Path, src: SourceConfig, work: Path, num_proc: int) -> datasets.Dataset:
    fmt = _jsonl_format(path, src) if src.format == Format.auto else src.format
    return datasets.Dataset.from_generator(
        _jsonl_rows,
        features=FEATURES,
        cache_dir=str(work),
        gen_kwargs={"shards": _jsonl_shards(path, JSONL_SHARD_BYTES), "src": src, "fmt": fmt},
        num_proc=num_proc if num_proc > 1 else None,
    )


def _jsonl_shards(path: Path, shard_bytes: int) -> list[tuple[str, int, int, int]]:
    """(path, start byte, end byte, first line number) pieces of a file, cut at line starts."""
    size, shards, start, line = path.stat().st_size, [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + shard_bytes, size))
            f.readline()
            end = min(f.tell(), size)
            f.seek(start)
            shards.append((str(path), start, end, line))
            line += f.read(end - start).count(b"\n")
            start = end
    return shards or [(str(path), 0, 0, 1)]


def _jsonl_rows(shards: list[tuple[str, int, int, int]], src: SourceConfig, fmt: Format):
    for path, start, end, line in shards:
        with open(path, "rb") as f:
            f.seek(start)
            while f.tell() < end:
                raw = f.readline()
                if raw.strip():
                    yield _jsonl_row(raw, src, fmt, f"{path}:{line}")
                line += 1


def _jsonl_row(raw: bytes, src: SourceConfig, fmt: Format, location: str) -> dict:
    try:
        row = _parse_line(raw)
    except BadRow as bad:
        return _bad(bad, src, location)
    return _check_row(row, src, fmt, location)


def _parse_line(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise BadRow("bad_json", f"bad JSON: {e.msg} at column {e.colno} (one JSON object per line expected)") from None


def _jsonl_format(path: Path, src: SourceConfig) -> Format:
    """`format: auto` for JSON Lines: the keys of the first line that parses as an object."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                return detect_format(row.keys(), src.name)
    raise DataError(f"source '{src.name}': {path} has no JSON object line to tell its format from")
