"""`ouro-eval score`: the verdicts of completions produced anywhere (our generation, vLLM, another harness).

    ouro-eval score --predictions FILE.jsonl --out DIR

Each row needs `completion` and `answer` (a string or a number); an optional `benchmark` names the
checker (a choice letter for gpqa_diamond, math otherwise; the default is math). Writes
DIR/scores.jsonl (every input row with `extracted` and `correct`, in input order) and DIR/score.json
(`{"accuracy", "n"}`), and prints the accuracy. The rows `ouro-eval --benchmark` writes are valid input.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ouro_train.config import SourceConfig
from ouro_train.data.sources import read_records
from ouro_train.data.validate import BadRow, DataError, require, require_text
from ouro_train.eval.answers import AnswerKind, check_answer
from ouro_train.eval.benchmarks import answer_text, get_benchmark


def score_file(predictions: Path) -> list[dict]:
    """Every row of `predictions` with `extracted` and `correct` added; DataError naming file:line and field."""
    source = SourceConfig(name="predictions", path=str(predictions))
    scored = []
    with tempfile.TemporaryDirectory(prefix="ouro-score-") as work:
        for location, row in read_records(source, Path(work)):
            try:
                kind = _kind(row)
                completion = require_text(require(row, "completion", "completion"), "completion")
                answer = answer_text(require(row, "answer", "answer"), "answer")
            except (BadRow, DataError) as bad:
                field = f"field '{bad.field}': " if isinstance(bad, BadRow) and bad.field else ""
                detail = bad.detail if isinstance(bad, BadRow) else str(bad)
                raise DataError(f"{location}: {field}{detail}") from None
            verdict = check_answer(completion, answer, kind)
            scored.append({**row, "extracted": verdict.extracted, "correct": verdict.correct})
    if not scored:
        raise DataError(f"{predictions} holds no rows")
    return scored


def _kind(row) -> AnswerKind:
    if not isinstance(row, dict):
        raise BadRow("bad_type", f"expected a JSON object, got {type(row).__name__}")
    name = row.get("benchmark")
    return AnswerKind.math if name is None else get_benchmark(require_text(name, "benchmark")).kind


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ouro-eval score", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", type=Path, required=True, help="jsonl rows with `completion` and `answer`")
    p.add_argument("--out", type=Path, required=True, help="directory for scores.jsonl and score.json")
    args = p.parse_args(argv)
    try:
        scored = score_file(args.predictions)
    except DataError as e:
        raise SystemExit(f"ouro-eval score: {e}") from None
    accuracy = sum(r["correct"] for r in scored) / len(scored)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    (args.out / "score.json").write_text(json.dumps({"accuracy": accuracy, "n": len(scored)}, indent=2) + "\n")
    print(f"accuracy {accuracy:.4f} over {len(scored)} rows; wrote {args.out / 'scores.jsonl'} and {args.out / 'score.json'}")
