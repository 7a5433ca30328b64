"""Row validation: the kinds of bad row, the checks that raise them, and what happens to them.

A bad row is reported as

    source 'math' data/samples/math.jsonl:17: field 'messages[2].role': unknown role 'robot' ...

naming the source, the file and 1-based line (or `row N` for parquet and hub datasets, 0-based), and
the field. With `data.on_bad_row=error` the first bad row (in source order, then file order) stops the
run before any tokenization; with `skip` bad rows are dropped and counted by reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

ROLES = ("system", "user", "assistant")

# Every reason a source row can be rejected for, in the order they are checked.
BAD_ROW_REASONS = (
    "invalid_utf8",
    "bad_json",
    "missing_field",
    "bad_type",
    "unknown_role",
    "non_string_content",
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


def check_role(role: Any, path: str, known: tuple = ROLES) -> None:
    if role not in known:
        raise BadRow("unknown_role", f"unknown role {role!r} (expected one of {', '.join(known)})", path)


def check_conversation(messages: list[dict], field: str) -> None:
    """What every conversation must have, whatever its source format."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "no assistant turn to train on", field)


def report_bad_rows(per_source: list[tuple[Counter, Optional[str]]], on_bad_row: str) -> Counter:
    """`per_source`: (bad-row counts by reason, first bad row's message) for each source, in order.

    Under `error` raises DataError with the first bad row's message; under `skip` returns the counts.
    """
    counts = sum((c for c, _ in per_source), Counter())
    first = next((message for _, message in per_source if message), None)
    if first and on_bad_row == "error":
        total = sum(counts.values())
        more = f" ({total} bad rows in all; data.on_bad_row=skip drops them)" if total > 1 else ""
        raise DataError(first + more)
    return counts
