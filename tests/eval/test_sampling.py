"""pass@k against a brute-force enumeration; resumable per-problem rows; `ouro-eval score` verdicts."""

import itertools
import json
from math import comb

import pytest

from ouro_train.eval.answers import AnswerKind, Problem
from ouro_train.eval.sampling import Setting, pass_at_k, read_done, sample_benchmark, summarise
from ouro_train.eval.score import main as score_cli
from ouro_train.eval.score import score_file
from ouro_train.generation import Completion, GenerationSettings


def _brute_force_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    with pytest.raises(ValueError):
        pass_at_k(n, n + 1, 1)


def test_pass_at_k_large_n_matches_binomials():
    assert pass_at_k(100, 7, 10) == pytest.approx(1 - comb(93, 10) / comb(100, 10), rel=1e-12)


PROBLEMS = [Problem(str(i), [{"role": "user", "content": f"q{i}", "reasoning": None}], "1", AnswerKind.math)
            for i in range(5)]


class ScriptedModel:
    """Completions that depend only on the seed and the row, like seeded sampling; counts calls and can
    stop after `fail_after` of them (a killed run)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, conversations, settings, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [Completion(f"<think>\nq\n</think>\n\n\\boxed{{{(seed + i) % 3}}}", 10 + i, settings.ut_steps, True)
                for i in range(len(conversations))]


def _untimed(line):
    row = json.loads(line)
    del row["seconds"]
    return json.dumps(row, sort_keys=True)


def _sample(model, path, done):
    return sample_benchmark(model, "math500", PROBLEMS, Setting(2), GenerationSettings(), samples=3, batch_size=6,
                            seed=7, predictions=path, done=done)


def test_a_killed_run_resumes_to_the_same_rows(tmp_path):
    whole = tmp_path / "whole.jsonl"
    _sample(ScriptedModel(), whole, {})
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(rows) == 5 * 3 and [r["problem"] for r in rows[:6]] == [0, 0, 0, 1, 1, 1]
    assert all(r["correct"] == (r["extracted"] == "1") for r in rows) and any(r["correct"] for r in rows)

    killed = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _sample(ScriptedModel(fail_after=1), killed, {})  # groups of 2 problems: the first group is written
    with open(killed, "a") as f:
        f.write(whole.read_text().splitlines()[6] + "\n" + '{"benchmark": "math5')  # problem 2 in part, a cut line
    resumed_model = ScriptedModel()
    results = _sample(resumed_model, killed, read_done(killed, samples=3))
    assert resumed_model.calls == 2  # groups {2, 3} and {4}
    assert sorted(map(_untimed, killed.read_text().splitlines())) == sorted(map(_untimed, whole.read_text().splitlines()))
    assert [r["completion"] for rows_ in results for r in rows_] == [r["completion"] for r in rows]

    summary = summarise(results, ks=[1, 3])
    per_problem = [sum(r["correct"] for r in rows[3 * p : 3 * p + 3]) for p in range(5)]
    assert summary["pass@1"] == pytest.approx(sum(c / 3 for c in per_problem) / 5)
    assert summary["pass@3"] == pytest.approx(sum(c > 0 for c in per_problem) / 5)
    assert summary["mean_steps"] == 2.0 and summary["problems"] == 5

    out = tmp_path / "scored"
    score_cli(["--predictions", str(whole), "--out", str(out)])
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in scored] == [r["correct"] for r in rows]
    assert [s["completion"] for s in scored] == [r["completion"] for r in rows]
    score = json.loads((out / "score.json").read_text())
    assert score == {"accuracy": pytest.approx(sum(r["correct"] for r in rows) / 15), "n": 15}


def test_score_uses_each_rows_checker_and_keeps_the_order(tmp_path):
    rows = [
        {"completion": "</think>\n\n\\boxed{\\frac12}", "answer": "0.5"},  # math by default
        {"completion": "The answer is $2\\sqrt{2}$.", "answer": "\\sqrt{8}", "benchmark": "math500"},
        {"completion": "</think> \\boxed{123}", "answer": 12, "benchmark": "aime24"},
        {"completion": "</think> so the answer is (C)", "answer": "C", "benchmark": "gpqa_diamond"},
        {"completion": "</think> \\boxed{C}", "answer": "B", "benchmark": "gpqa_diamond", "extra": [1]},
        {"completion": "<think>\n\\boxed{5}", "answer": "5"},
    ]
    path = tmp_path / "vllm_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = score_file(path)
    assert [s["correct"] for s in scored] == [True, True, False, True, False, False]
    assert [s["extracted"] for s in scored] == ["\\frac12", "2\\sqrt{2}", "123", "C", "C", None]
    assert scored[4]["extra"] == [1]


@pytest.mark.parametrize("line, message", [
    ('{"answer": "1"}', r"bad.jsonl:2: field 'completion': missing or null"),
    ('{"completion": "x", "answer": ["1"]}', r"bad.jsonl:2: field 'answer': expected a string"),
    ('{"completion": "x", "answer": "1", "benchmark": "mmlu"}', r"bad.jsonl:2: unknown benchmark 'mmlu'"),
    ('{"completion": "x", "answer": "1"', r"bad.jsonl:2: bad JSON"),
])
def test_score_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"completion": "x", "answer": "1"}\n' + line + "\n")
    with pytest.raises(SystemExit, match=message):
        score_cli(["--predictions", str(path), "--out", str(tmp_path / "out")])
