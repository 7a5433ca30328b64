"""Row validation: the kinds of bad row, the checks that raise them, and what happens to them.

A bad row is reported as

    source 'math' data/samples/math.jsonl:17: field 'messages[2].role': unknown role 'robot' ...

naming the source, the file and 1-based line (or `row N` for parquet and hub datasets, 0-based), and
the field. With `data.on_bad_row=error` the first bad row (in source order, then file order) stops the
run before any tokenization. With `skip` bad rows are dropped and counted by reason, within a budget:
a source whose bad rows exceed `max_bad_fraction` of its rows stops the run, and so does a source with
no valid row at all (whatever `on_bad_row`), so a run never starts on nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Optional, Sequence

ROLES = ("system", "user", "assistant", "tool")

# Every reason a source row can be rejected for, in the order they are checked.
BAD_ROW_REASONS = (
    "invalid_utf8",
    "bad_json",
    "missing_field",
    "bad_type",
    "unknown_role",
    "non_string_content",
    "unsupported_part",
    "unclosed_think",
    "stray_think_tag",
    "empty_answer",
    "no_assistant_turn",
)


class DataError(Exception):
    """A problem with the data or the data config, reported to the user as one line."""


class BadRow(Exception):
    """Raised by the format adapters; `location` is filled in by whoever knows where the row came from."""

    def __init__(self, reason: str, detail: str, field: Optional[str] = None):
        assert reason in BAD_ROW_REASONS, reason
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field

    def message(self, source: str, location: str) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"source '{source}' {location}: {where}{self.detail}"


def require(row: dict, key: str, path: str) -> Any:
    """row[key], which must be present and not null."""
    if not isinstance(row, dict):
        raise BadRow("bad_type", f"expected an object, got {type(row).__name__}", path.rsplit(".", 1)[0] or None)
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", "missing or null", path)
    return value


def require_list(value: Any, path: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise BadRow("bad_type", f"expected a list, got {type(value).__name__}", path)
    return list(value)


def require_text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise BadRow("non_string_content", f"expected a string, got {type(value).__name__}", path)
    return value


def optional_text(row: dict, key: Optional[str], path: Optional[str]) -> Optional[str]:
    """row[key] if present (a string), else None; a key of None means the column is ignored."""
    value = None if key is None else row.get(key)
    return None if value is None else require_text(value, path)


def check_conversation(messages: list[dict], field: str) -> None:
    """What every conversation must have, whatever its source format."""
    if not any(m["role"] == "assistant" and m["train"] for m in messages):
        raise BadRow("no_assistant_turn", "no assistant turn to train on", field)


def check_budgets(per_source: Sequence[tuple], on_bad_row: str, default_budget: float, log: Optional[str]) -> None:
    """`per_source`: (source config, rows read, valid rows, bad-row counts by reason, first bad row's
    message) for each source, in order. Raises DataError with the first bad row under `error`; under
    `skip` for the first source over its budget; under either for a source with no valid row."""
    first = next((message for *_, message in per_source if message), None)
    if first and on_bad_row == "error":
        total = sum(sum(counts.values()) for _, _, _, counts, _ in per_source)
        more = f" ({total} bad rows in all; data.on_bad_row=skip drops them)" if total > 1 else ""
        raise DataError(first + more)
    where = f"; the first bad rows are in {log}" if log else ""
    for src, rows, valid, counts, message in per_source:
        bad = sum(counts.values())
        budget = default_budget if src.max_bad_fraction is None else src.max_bad_fraction
        option = "data.max_bad_fraction" if src.max_bad_fraction is None else "its max_bad_fraction"
        reasons = ", ".join(f"{r} {n:,}" for r, n in counts.most_common())
        if valid == 0:
            origin = src.path if src.path is not None else f"{src.hf_id} (split {src.split})"
            found = (f": all {bad:,} rows are bad ({reasons}); first: {message}{where}" if bad
                     else f": it read no row from {origin}")
            raise DataError(f"source '{src.name}' has no valid row{found}")
        if bad > math.floor(budget * rows):
            raise DataError(
                f"source '{src.name}': {bad:,} bad rows of {rows:,} ({bad / rows:.2%}) exceed {option}={budget:g} "
                f"({reasons}); first: {message}{where}"
            )


def check_data_config(data) -> None:
    """The data settings a prepare cannot start without, named by their dotted config path."""
    if not 0 <= data.max_bad_fraction <= 1:
        raise DataError(f"data.max_bad_fraction must be in [0, 1], got {data.max_bad_fraction}")
    for key in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(data, key)):
            name = f"data.{key}[{i}]"
            if src.max_bad_fraction is not None and not 0 <= src.max_bad_fraction <= 1:
                raise DataError(f"{name}.max_bad_fraction must be in [0, 1], got {src.max_bad_fraction}")
            for raw, role in src.role_map.items():
                if role not in ROLES:
                    raise DataError(f"{name}.role_map.{raw}: {role!r} is not one of {', '.join(ROLES)}")
            if src.path is not None and (src.data_files or src.streaming):
                raise DataError(f"{name}: data_files and streaming are for hub sources (hf_id); a path names its own files")
