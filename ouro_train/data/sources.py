"""Load a source into a `datasets.Dataset` of validated conversations, one row per source row.

Every source, whatever its format, becomes the columns of `FEATURES`:
  `messages` [{role, content, reasoning, train}], `reason` ("" for a good row, else a reason from
  `validate.BAD_ROW_REASONS`), `error` (the bad row's one-line message, naming source, location and
  field), `location` (the bad row's file:line or row), `where` (the row's values of the columns that
  `where` filters look at, as JSON; the filter itself is applied by the pipeline, so sources that differ
  only in `where` share one scan) and `has_reasoning`.

Local JSON files are read by our own generator rather than datasets' json builder: that builder loses
line numbers and fails a whole file on one malformed line, while a bad row must be reported (or
skipped) as `file:line`. A file is JSON Lines, or (first character `[`) one JSON array whose elements
are located as `file:line (item N)`; a UTF-8 BOM and CRLF line ends are accepted. Large JSON Lines
files are split at line boundaries so `num_proc` processes share them; an array is parsed whole by one
process. Parquet files and hub datasets go through `load_dataset` and are checked with
`.map(num_proc=...)`, or, with `streaming: true`, as they stream in (one process); their rows are
located by 0-based row index.

`read_records` reads the same files and hub datasets as raw rows with those locations, for tables
that are not conversations (evaluation benchmarks, prediction files).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
from datasets.exceptions import DatasetGenerationError

from ouro_train.config import Format, SourceConfig
from ouro_train.data.formats import RowReader, detect_format
from ouro_train.data.validate import BadRow, DataError

FEATURES = datasets.Features(
    {
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.Value("string"),
                "reasoning": datasets.Value("string"),
                "train": datasets.Value("bool"),
            }
        ),
        "reason": datasets.Value("string"),
        "error": datasets.Value("string"),
        "location": datasets.Value("string"),
        "where": datasets.Value("string"),
        "has_reasoning": datasets.Value("bool"),
    }
)
JSONL_SHARD_BYTES = 64 << 20
BOM = b"\xef\xbb\xbf"
WHITESPACE = re.compile(r"[ \t\n\r]*")
NEWLINE = "\n"


def local_files(src: SourceConfig) -> list[Path]:
    """The files a local source names (a path or a glob), sorted; DataError if there are none."""
    matches = sorted(Path(p) for p in glob.glob(str(Path(src.path).expanduser())))
    if not matches:
        raise DataError(f"source '{src.name}': no file matches path {src.path}")
    return matches


def load_source(
    src: SourceConfig, work_dir: Path, num_proc: int = 1, where_keys: Sequence[str] = (), allow_empty_answer: bool = False
) -> datasets.Dataset:
    """All rows of `src`, validated, with intermediate Arrow files under `work_dir`; the `where`
    column holds each row's values of `where_keys`."""
    if (src.path is None) == (src.hf_id is None):
        raise DataError(f"source '{src.name}': set exactly one of `path` and `hf_id`")
    work_dir.mkdir(parents=True, exist_ok=True)
    # a tuple: datasets shards a generator over its list arguments
    check = {"src": src, "where_keys": tuple(where_keys), "allow_empty_answer": allow_empty_answer}
    if src.hf_id is not None:
        return _load_hub(check, work_dir, num_proc)
    parts = []
    for i, path in enumerate(local_files(src)):
        if path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work_dir / "hf"))
            parts.append(_check_table(ds, check, str(path), work_dir / f"{i}", num_proc))
        elif path.suffix in (".jsonl", ".json"):
            parts.append(_read_json(path, check, work_dir / f"{i}", num_proc))
        else:
            raise DataError(f"source '{src.name}': unsupported file type {path} (use .jsonl/.json or .parquet)")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_records(src: SourceConfig, work_dir: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of `src`, for tables that are not conversations (benchmarks,
    predictions), located as the conversation sources are. A row that is not valid JSON raises
    DataError naming it."""
    if (src.path is None) == (src.hf_id is None):
        raise DataError(f"source '{src.name}': set exactly one of `path` and `hf_id`")
    if src.hf_id is not None:
        args, label = _hub_args(src)
        yield from ((f"{label} row {i}", row) for i, row in enumerate(datasets.load_dataset(**args)))
        return
    for path in local_files(src):
        if path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(work_dir / "hf"))
            yield from ((f"{path} row {i}", row) for i, row in enumerate(ds))
        elif path.suffix not in (".jsonl", ".json"):
            raise DataError(f"source '{src.name}': unsupported file type {path} (use .jsonl/.json or .parquet)")
        elif _is_json_array(path):
            yield from ((f"{path}:{line} (item {index})", value) for index, line, value in _array_items(str(path), src))
        else:
            with open(path, "rb") as f:
                for line, raw in enumerate(f, start=1):
                    raw = raw.removeprefix(BOM) if line == 1 else raw
                    if raw.strip():
                        try:
                            yield f"{path}:{line}", _parse_json_line(raw)
                        except BadRow as bad:
                            raise DataError(bad.message(src.name, f"{path}:{line}")) from None


def _checked_row(row: Any, reader: RowReader, where_keys: Sequence[str], location: str) -> dict:
    where = json.dumps([row.get(k) for k in where_keys], default=str) if where_keys and isinstance(row, dict) else ""
    try:
        messages = reader.read(row)
    except BadRow as bad:
        return _bad(bad, reader.src, location, where)
    has_reasoning = any(m["reasoning"] is not None for m in messages if m["role"] == "assistant")
    return {"messages": messages, "reason": "", "error": "", "location": "", "where": where, "has_reasoning": has_reasoning}


def _bad(bad: BadRow, src: SourceConfig, location: str, where: str = "") -> dict:
    message = bad.message(src.name, location)
    return {"messages": [], "reason": bad.reason, "error": message, "location": location, "where": where, "has_reasoning": False}


def _reader(check: dict, fmt: Format) -> RowReader:
    return RowReader(check["src"], fmt, check["allow_empty_answer"])


# ---- parquet and hub datasets -------------------------------------------------------------------


def _hub_args(src: SourceConfig) -> tuple[dict, str]:
    """`load_dataset` arguments of a hub source, and the label its rows are located by."""
    args = {"path": src.hf_id, "name": src.hf_name, "split": src.split, "revision": src.revision,
            "data_files": list(src.data_files) or None}
    label = src.hf_id + (f"/{src.hf_name}" if src.hf_name else "") + (f"@{src.revision}" if src.revision else "")
    return args, label + f"[{src.split}]"


def _load_hub(check: dict, work: Path, num_proc: int) -> datasets.Dataset:
    src = check["src"]
    args, label = _hub_args(src)
    if not src.streaming:
        return _check_table(datasets.load_dataset(**args), check, label, work / "hub", num_proc)
    return _from_generator(_stream_rows, {"args": args, "check": check, "label": label}, work / "hub", 1)


def _check_table(ds: datasets.Dataset, check: dict, label: str, work: Path, num_proc: int) -> datasets.Dataset:
    src = check["src"]
    fmt = detect_format(ds.column_names, src.name) if src.format == Format.auto else src.format
    work.mkdir(parents=True, exist_ok=True)
    return ds.map(
        _check_batch,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=FEATURES,
        fn_kwargs={"reader": _reader(check, fmt), "where_keys": check["where_keys"], "label": label},
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(work / "checked.arrow"),
        desc=f"checking {src.name}",
    )


def _check_batch(batch: dict, indices: list[int], reader: RowReader, where_keys: Sequence[str], label: str) -> dict:
    keys = list(batch)
    rows = [_checked_row({k: batch[k][j] for k in keys}, reader, where_keys, f"{label} row {idx}")
            for j, idx in enumerate(indices)]
    return {name: [r[name] for r in rows] for name in FEATURES}


def _stream_rows(args: dict, check: dict, label: str) -> Iterator[dict]:
    """The rows of a streamed hub dataset, checked as they arrive (only the results are written)."""
    reader = None
    for idx, row in enumerate(datasets.load_dataset(**args, streaming=True)):
        if reader is None:
            src = check["src"]
            reader = _reader(check, detect_format(row.keys(), src.name) if src.format == Format.auto else src.format)
        yield _checked_row(row, reader, check["where_keys"], f"{label} row {idx}")


def _from_generator(generator, gen_kwargs: dict, work: Path, num_proc: int) -> datasets.Dataset:
    """Dataset.from_generator, with a DataError raised inside the generator passed on unwrapped."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=FEATURES, cache_dir=str(work), gen_kwargs=gen_kwargs,
            num_proc=num_proc if num_proc > 1 else None,
        )
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


# ---- local JSON: JSON Lines or one array ----------------------------------------------------------


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(BOM).lstrip()


def _is_json_array(path: Path) -> bool:
    return _head(path).startswith(b"[")


def _read_json(path: Path, check: dict, work: Path, num_proc: int) -> datasets.Dataset:
    head = _head(path)
    if not head.strip(b"[] \t\r\n") and path.stat().st_size <= 4096:  # no row (a generator must yield one)
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    if head.startswith(b"["):
        return _from_generator(_json_array_rows, {"path": str(path), "check": check}, work, 1)
    src = check["src"]
    fmt = _jsonl_format(path, src) if src.format == Format.auto else src.format
    shards = _jsonl_shards(path, JSONL_SHARD_BYTES)
    return _from_generator(_jsonl_rows, {"shards": shards, "reader": _reader(check, fmt), "where_keys": check["where_keys"]},
                           work, num_proc)


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


def _jsonl_rows(shards: list[tuple[str, int, int, int]], reader: RowReader, where_keys: Sequence[str]) -> Iterator[dict]:
    for path, start, end, line in shards:
        with open(path, "rb") as f:
            f.seek(start)
            while f.tell() < end:
                raw = f.readline()
                if line == 1:
                    raw = raw.removeprefix(BOM)
                if raw.strip():
                    yield _jsonl_row(raw, reader, where_keys, f"{path}:{line}")
                line += 1


def _jsonl_row(raw: bytes, reader: RowReader, where_keys: Sequence[str], location: str) -> dict:
    try:
        row = _parse_json_line(raw)
    except BadRow as bad:
        return _bad(bad, reader.src, location)
    return _checked_row(row, reader, where_keys, location)


def _parse_json_line(raw: bytes) -> Any:
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
                row = json.loads(raw.removeprefix(BOM))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                return detect_format(row.keys(), src.name)
    raise DataError(f"source '{src.name}': {path} has no JSON object line to tell its format from")


def _json_array_rows(path: str, check: dict) -> Iterator[dict]:
    """The elements of a JSON array file, each located by its first line and index. A file that is not
    a well-formed array cannot be cut into rows: that is a DataError, whatever `on_bad_row`."""
    src = check["src"]
    items = list(_array_items(path, src))
    if src.format != Format.auto:
        fmt = src.format
    else:
        first = next((value for _, _, value in items if isinstance(value, dict)), None)
        if first is None:
            raise DataError(f"source '{src.name}': {path} holds no JSON object to tell its format from")
        fmt = detect_format(first.keys(), src.name)
    reader = _reader(check, fmt)
    for index, line, value in items:
        yield _checked_row(value, reader, check["where_keys"], f"{path}:{line} (item {index})")


def _array_items(path: str, src: SourceConfig) -> Iterator[tuple[int, int, Any]]:
    """(index, line, value) of each element of the JSON array in `path`."""
    raw = Path(path).read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"source '{src.name}' {path}:{line}: invalid UTF-8 at byte {e.start} of the file") from None

    def fail(at: int, what: str) -> DataError:
        return DataError(f"source '{src.name}' {path}:{text.count(NEWLINE, 0, at) + 1}: bad JSON array: {what}")

    decoder, index = json.JSONDecoder(), 0
    pos = WHITESPACE.match(text, 1 + text.index("[")).end()
    line = text.count(NEWLINE, 0, pos) + 1
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, f"{e.msg} at column {e.colno} (item {index})") from None
            yield index, line, value
            after = WHITESPACE.match(text, end).end()
            if text.startswith("]", after):
                pos = after + 1
                break
            if not text.startswith(",", after):
                raise fail(after, f"expected ',' or ']' after item {index}")
            next_pos = WHITESPACE.match(text, after + 1).end()
            line += text.count(NEWLINE, pos, next_pos)
            pos, index = next_pos, index + 1
    if text[pos:].strip():
        raise fail(pos, "text after the closing ']'")
