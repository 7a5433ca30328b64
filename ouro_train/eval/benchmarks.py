"""Reasoning benchmarks by schema: rows of a local file or a hub dataset -> problems with a prompt and a reference.

| name            | columns                                                     | answer | default hub data                       |
|-----------------|-------------------------------------------------------------|--------|----------------------------------------|
| `math500`       | `problem`, `answer`                                         | math   | HuggingFaceH4/MATH-500 [test]          |
| `aime24`        | `problem` or `Problem`, `answer` or `Answer`                | math   | HuggingFaceH4/aime_2024 [train]        |
| `aime25`        | as aime24                                                   | math   | yentinglin/aime_2025 [train]           |
| `olympiadbench` | `question`, `final_answer` (a list of strings)              | math   | Hothan/OlympiadBench OE_TO_maths_en_COMP [train] |
| `gpqa_diamond`  | `Question`, `Correct Answer`, `Incorrect Answer 1`..`3`     | choice | Idavidrein/gpqa gpqa_diamond [train]   |
| `chat`          | the project's chat formats; the last assistant turn states the answer | math | none                       |

Rows are read through the data pipeline (`data.sources.read_records`: JSON Lines, Parquet, hub ids
with the `datasets` cache, offline too); a bad row stops with its `file:line` and field. The prompt is
one user turn, the problem followed by `MATH_INSTRUCTION` (the wording of OpenCompass's AIME
configuration); GPQA lists its four options, shuffled by `(seed, row)`, and asks for the letter.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ouro_train.config import SourceConfig
from ouro_train.data.sources import read_records
from ouro_train.data.validate import BadRow, DataError, require, require_list, require_text
from ouro_train.eval.answers import CHOICE_LETTERS, AnswerKind, Problem, answer_tasks
from ouro_train.eval.data import read_conversations

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."


@dataclass(frozen=True)
class DataRef:
    """Where a benchmark's rows are: a local file (or glob), or a hub dataset with its subset and split."""

    path: str | None = None
    hf_id: str | None = None
    hf_name: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, text: str) -> "DataRef":
        """A local path if it exists or names a file type, else `HUB_ID[:SUBSET][@SPLIT]`."""
        if Path(text).expanduser().exists() or Path(text).suffix in (".jsonl", ".json", ".parquet") or "*" in text:
            return cls(path=text)
        spec, _, split = text.partition("@")
        hf_id, _, name = spec.partition(":")
        return cls(hf_id=hf_id, hf_name=name or None, split=split or "train")

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return self.hf_id + (f":{self.hf_name}" if self.hf_name else "") + f"@{self.split}"


# A row -> (question text, reference answer); raises BadRow naming the field.
RowReader = Callable[[dict, int, random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: AnswerKind
    default_data: DataRef | None
    read_row: RowReader | None  # None: the chat formats, read as conversations

    def load(self, data: DataRef | None = None, seed: int = 0, max_problems: int | None = None) -> list[Problem]:
        data = data or self.default_data
        if data is None:
            raise DataError(f"benchmark '{self.name}' has no default data: give --data FILE")
        problems = self._chat(data, max_problems) if self.read_row is None else self._rows(data, seed, max_problems)
        if not problems:
            raise DataError(f"benchmark '{self.name}': {data} holds no problems")
        return problems

    def _rows(self, data: DataRef, seed: int, max_problems: int | None) -> list[Problem]:
        source = SourceConfig(name=self.name, path=data.path, hf_id=data.hf_id, hf_name=data.hf_name, split=data.split)
        problems = []
        with tempfile.TemporaryDirectory(prefix="ouro-bench-") as work:
            for index, (location, row) in enumerate(read_records(source, Path(work))):
                if max_problems is not None and index >= max_problems:
                    break
                try:
                    if not isinstance(row, dict):
                        raise BadRow("bad_type", f"expected a JSON object, got {type(row).__name__}")
                    question, reference = self.read_row(row, index, random.Random(f"{seed}:{index}"))
                except BadRow as bad:
                    field = f"field '{bad.field}': " if bad.field else ""
                    raise DataError(f"benchmark '{self.name}' {location}: {field}{bad.detail}") from None
                prompt = [{"role": "user", "content": question, "reasoning": None}]
                problems.append(Problem(_row_id(row, index), prompt, reference, self.kind))
        return problems

    def _chat(self, data: DataRef, max_problems: int | None) -> list[Problem]:
        if data.path is None:
            raise DataError(f"benchmark '{self.name}' reads local chat files; got the hub id {data.hf_id}")
        return answer_tasks(read_conversations(data.path))[:max_problems]


def _row_id(row: dict, index: int) -> str:
    """The row's own id where its schema has one (MATH-500's `unique_id`, GPQA's `Record ID`), else its index."""
    return str(next((row[k] for k in ("id", "unique_id", "Record ID") if row.get(k) is not None), index))


def _first(row: dict, keys: tuple[str, ...]) -> tuple[Any, str]:
    """The first of `keys` present in the row (value, key); BadRow naming them all if none is."""
    for key in keys:
        if row.get(key) is not None:
            return row[key], key
    raise BadRow("missing_field", "missing or null", " or ".join(keys))


def answer_text(value: Any, field: str) -> str:
    """A reference answer as text: a string, or a number as written (AIME's integer answers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return require_text(value, field).strip()


def _math_row(problem_keys: tuple[str, ...], answer_keys: tuple[str, ...]) -> RowReader:
    def read(row: dict, index: int, rng: random.Random) -> tuple[str, str]:
        problem, key = _first(row, problem_keys)
        answer, answer_key = _first(row, answer_keys)
        return f"{require_text(problem, key).strip()}\n{MATH_INSTRUCTION}", answer_text(answer, answer_key)

    return read


def _olympiad_row(row: dict, index: int, rng: random.Random) -> tuple[str, str]:
    question = require_text(require(row, "question", "question"), "question").strip()
    answers = require_list(require(row, "final_answer", "final_answer"), "final_answer")
    if not answers:
        raise BadRow("missing_field", "empty list", "final_answer")
    parts = [require_text(a, f"final_answer[{i}]").strip().strip("$").strip() for i, a in enumerate(answers)]
    return f"{question}\n{MATH_INSTRUCTION}", ", ".join(parts)


def _gpqa_row(row: dict, index: int, rng: random.Random) -> tuple[str, str]:
    fields = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    question = require_text(require(row, "Question", "Question"), "Question").strip()
    options = [require_text(require(row, f, f), f).strip() for f in fields]
    order = list(range(len(options)))
    rng.shuffle(order)  # order[j]: which option is shown as letter j
    listed = "\n".join(f"({CHOICE_LETTERS[j]}) {options[i]}" for j, i in enumerate(order))
    return f"{question}\n\n{listed}\n\n{CHOICE_INSTRUCTION}", CHOICE_LETTERS[order.index(0)]


BENCHMARKS = {b.name: b for b in (
    Benchmark("math500", AnswerKind.math, DataRef(hf_id="HuggingFaceH4/MATH-500", split="test"),
              _math_row(("problem",), ("answer",))),
    Benchmark("aime24", AnswerKind.math, DataRef(hf_id="HuggingFaceH4/aime_2024"),
              _math_row(("problem", "Problem"), ("answer", "Answer"))),
    Benchmark("aime25", AnswerKind.math, DataRef(hf_id="yentinglin/aime_2025"),
              _math_row(("problem", "Problem"), ("answer", "Answer"))),
    Benchmark("olympiadbench", AnswerKind.math, DataRef(hf_id="Hothan/OlympiadBench", hf_name="OE_TO_maths_en_COMP"),
              _olympiad_row),
    Benchmark("gpqa_diamond", AnswerKind.choice, DataRef(hf_id="Idavidrein/gpqa", hf_name="gpqa_diamond"), _gpqa_row),
    Benchmark("chat", AnswerKind.math, None, None),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]
