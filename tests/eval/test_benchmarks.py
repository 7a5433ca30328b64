"""Benchmark schemas through the data pipeline, and `ouro-eval --benchmark` end to end on a tiny model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from conftest import shared_path, tiny_model
from ouro_train.data.validate import DataError
from ouro_train.eval.answers import AnswerKind
from ouro_train.eval.benchmarks import MATH_INSTRUCTION, DataRef, get_benchmark
from ouro_train.eval.cli import main as eval_cli
from ouro_train.eval.sampling import pass_at_k
from ouro_train.export import export_model


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gpqa_rows():
    return [{"Question": f"Which gas is number {i}?", "Correct Answer": "argon", "Incorrect Answer 1": "neon",
             "Incorrect Answer 2": "xenon", "Incorrect Answer 3": "radon", "Record ID": f"rec{i}"} for i in range(2)]


@pytest.fixture()
def files(tmp_path):
    """A small file of every schema (AIME as Parquet with the capitalised columns and integer answers)."""
    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"Problem": ["Find 2+3.", "Find 7*6."], "Answer": [5, 42]}), aime)
    return {
        "math500": _jsonl(tmp_path / "math500.jsonl", [
            {"problem": "What is 1/2 + 1/2?", "answer": "1", "unique_id": "test/a.json"},
            {"problem": "Simplify \\sqrt{8}.", "answer": "2\\sqrt{2}", "unique_id": "test/b.json"}]),
        "aime24": aime,
        "olympiadbench": _jsonl(tmp_path / "olympiad.jsonl", [
            {"id": 7, "question": "Solve x^2 = 4.", "final_answer": ["$2$", "$-2$"]},
            {"id": 8, "question": "Compute 3!.", "final_answer": ["$6$"]}]),
        "gpqa_diamond": _jsonl(tmp_path / "gpqa.jsonl", _gpqa_rows()),
        "chat": _jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is 4."}]},
            {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "So \\boxed{6}"}]}]),
    }


def test_each_schema_loads_into_problems(files):
    math = get_benchmark("math500").load(DataRef.parse(str(files["math500"])))
    assert [p.id for p in math] == ["test/a.json", "test/b.json"] and math[1].reference == "2\\sqrt{2}"
    assert math[0].prompt == [{"role": "user", "content": f"What is 1/2 + 1/2?\n{MATH_INSTRUCTION}", "reasoning": None}]
    aime = get_benchmark("aime24").load(DataRef.parse(str(files["aime24"])))
    assert [(p.reference, p.kind) for p in aime] == [("5", AnswerKind.math), ("42", AnswerKind.math)]
    olympiad = get_benchmark("olympiadbench").load(DataRef.parse(str(files["olympiadbench"])))
    assert [p.reference for p in olympiad] == ["2, -2", "6"] and olympiad[0].id == "7"
    chat = get_benchmark("chat").load(DataRef.parse(str(files["chat"])))
    assert [p.reference for p in chat] == ["4", "6"] and chat[0].prompt[-1]["content"] == "2+2?"


def test_gpqa_options_are_shuffled_by_seed_and_the_letter_follows_the_correct_one(files):
    def load(seed):
        return get_benchmark("gpqa_diamond").load(DataRef.parse(str(files["gpqa_diamond"])), seed=seed)

    letters = {}
    for seed in range(8):
        problems = load(seed)
        assert [p.id for p in problems] == ["rec0", "rec1"]
        for p in problems:
            options = dict(line[1:].split(") ", 1) for line in p.prompt[0]["content"].splitlines() if line[:1] == "(")
            assert sorted(options) == ["A", "B", "C", "D"]
            assert sorted(options.values()) == ["argon", "neon", "radon", "xenon"]
            assert options[p.reference] == "argon" and p.kind is AnswerKind.choice
        letters[seed] = [p.reference for p in problems]
    assert [p.reference for p in load(3)] == letters[3]  # the same seed shows the same order
    assert len({tuple(v) for v in letters.values()}) > 1  # other seeds, other orders


@pytest.mark.parametrize("name, row, message", [
    ("math500", {"problem": "x"}, r"benchmark 'math500' .*bad.jsonl:2: field 'answer': missing or null"),
    ("aime24", {"Problem": "x", "Answer": [1]}, r"bad.jsonl:2: field 'Answer': expected a string"),
    ("aime24", {"question": "x", "answer": 1}, r"bad.jsonl:2: field 'problem or Problem': missing"),
    ("olympiadbench", {"question": "x", "final_answer": "3"}, r"bad.jsonl:2: field 'final_answer': expected a list"),
    ("gpqa_diamond", {**_gpqa_rows()[0], "Incorrect Answer 2": None}, r"bad.jsonl:2: field 'Incorrect Answer 2'"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path, name, row, message):
    good = {"math500": {"problem": "p", "answer": "1"}, "aime24": {"problem": "p", "answer": 1},
            "olympiadbench": {"question": "q", "final_answer": ["1"]}, "gpqa_diamond": _gpqa_rows()[1]}[name]
    path = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=message):
        get_benchmark(name).load(DataRef.parse(str(path)))


def test_data_refs():
    assert DataRef.parse("Idavidrein/gpqa:gpqa_diamond@train") == DataRef(hf_id="Idavidrein/gpqa",
                                                                         hf_name="gpqa_diamond", split="train")
    assert DataRef.parse("HuggingFaceH4/MATH-500@test") == DataRef(hf_id="HuggingFaceH4/MATH-500", split="test")
    assert DataRef.parse("data/missing.jsonl") == DataRef(path="data/missing.jsonl")


@pytest.fixture()
def one_thread():
    """Tiny-model decoding is latency-bound: on a busy 2-core runner two torch threads wait on each other
    (measured 10x slower per generate call than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ouro_eval_benchmark_end_to_end(files, tmp_path, one_thread):
    tokenizer = AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))
    export = export_model(tiny_model(seed=12, vocab_size=49152), tmp_path / "export", tokenizer, dtype="fp32")
    out = tmp_path / "eval"
    names = list(files)
    argv = [a for name in names for a in ("--benchmark", name, "--data", str(files[name]))] + [
        "--model", str(export), "--out", str(out), "--samples", "2", "--pass-k", "1,2", "--max-new-tokens", "3",
        "--ut-steps", "1,3,4", "--thresholds", "0.5", "--batch-size", "4", "--seed", "5"]
    eval_cli(argv)

    predictions = out / "predictions.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    settings = ["T=1", "T=3", "T=4", "T=3 exit=0.5"]
    assert len(rows) == len(names) * len(settings) * 2 * 2  # benchmarks x settings x problems x samples
    for row in rows:
        assert row["completion"].startswith("<think>\n") and 1 <= row["tokens"] <= 3
        assert row["correct"] is False or row["extracted"] is not None
        if row["threshold"] == 1.0:
            assert row["mean_steps"] == row["ut_steps"]
        else:
            assert 1 <= row["mean_steps"] <= 3
    result = json.loads((out / "eval.json").read_text())
    assert result["trained_ut_steps"] == 3 and result["generation"]["seed"] == 5
    for name in names:
        scores = result["benchmarks"][name]
        assert [r["ut_steps"] for r in scores["per_step"]] == [1, 3, 4]
        assert [(r["ut_steps"], r["threshold"]) for r in scores["per_threshold"]] == [(3, 0.5)]
        for summary in scores["per_step"] + scores["per_threshold"]:
            mine = [r for r in rows if r["benchmark"] == name and r["ut_steps"] == summary["ut_steps"]
                    and r["threshold"] == summary["threshold"]]
            correct = [sum(r["correct"] for r in mine if r["problem"] == p) for p in range(2)]
            assert summary["pass@2"] == pytest.approx(sum(pass_at_k(2, c, 2) for c in correct) / 2)
            assert summary["tokens"] == sum(r["tokens"] for r in mine) and summary["tok_per_s"] > 0
    png = (out / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # A killed run: the last problem of some settings lost, and a line cut in the middle.
    kept = predictions.read_text().splitlines()[:-6]
    predictions.write_text("\n".join(kept) + "\n" + kept[-1][:40])
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        eval_cli(argv)
    with pytest.raises(SystemExit, match=r"other settings .* seed: 5 -> 6"):
        eval_cli([*argv[:-1], "6", "--resume"])
    eval_cli([*argv, "--resume"])
    resumed = [json.loads(line) for line in predictions.read_text().splitlines()]
    key = lambda r: (r["benchmark"], r["setting"], r["problem"], r["sample"])  # noqa: E731
    assert sorted((key(r), r["completion"], r["seed"]) for r in resumed) == \
        sorted((key(r), r["completion"], r["seed"]) for r in rows)

    # Scoring the completions apart from generating them gives the generating run's verdicts.
    eval_cli(["score", "--predictions", str(predictions), "--out", str(tmp_path / "scored")])
    scored = [json.loads(line) for line in (tmp_path / "scored" / "scores.jsonl").read_text().splitlines()]
    assert [(s["extracted"], s["correct"]) for s in scored] == [(r["extracted"], r["correct"]) for r in resumed]


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], r"--samples must be >= 1, got 0"),
    (["--samples", "2", "--pass-k", "1,4"], r"--pass-k must be in 1..--samples \(2\), got \[1, 4\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--thresholds", "0.5,1.0"], r"--thresholds must be in \(0, 1\)"),
    (["--data", "a.jsonl", "--data", "b.jsonl"], r"2 --data for 1 --benchmark"),
    (["--backend", "vllm", "--thresholds", "0.5"], r"vLLM has no adaptive exit"),
])
def test_bad_flags_fail_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        eval_cli(["--benchmark", "aime24", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path), *flags])
