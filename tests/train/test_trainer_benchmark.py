"""The trainer's periodic evaluation with a small generation benchmark (`eval.benchmark`)."""

import json

import pytest

from conftest import run_in_process
from train_helpers import compose_run, metrics
from ouro_train.cli import train
from ouro_train.data.validate import DataError
from ouro_train.eval.during_training import benchmark_evaluator
from ouro_train.train.trainer import Trainer


def test_benchmark_accuracy_is_logged_at_every_evaluation(tmp_path):
    problems = tmp_path / "math500.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(5)))
    cfg = compose_run(f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "wandb.mode=disabled",
                      "export_at_end=false", "max_steps=2", "eval.every_n_steps=1", "eval.benchmark=math500",
                      f"eval.benchmark_data={problems}", "eval.benchmark_samples=3", "eval.benchmark_max_new_tokens=4")
    evaluator = benchmark_evaluator(cfg)
    assert evaluator.num_problems == 3  # the first benchmark_samples problems
    trainer = Trainer(cfg, evaluators=[evaluator])
    trainer.train()
    evals = metrics(tmp_path / "run", split="eval")
    assert sorted(evals) == [1, 2]  # no eval data: the benchmark alone makes the evaluation
    for record in evals.values():
        assert 0.0 <= record["eval_math500_accuracy"] <= 1.0
        assert record["eval_math500_mean_steps"] == 3.0  # the smoke model's T, every step run
        assert "eval_loss" not in record
    assert trainer.engine.module.training  # back to training mode after generating


def test_a_bad_benchmark_fails_before_any_work(tmp_path, monkeypatch, capsys):
    with pytest.raises(DataError, match="unknown benchmark 'mat500'"):
        benchmark_evaluator(compose_run(f"output_dir={tmp_path}", "eval.benchmark=mat500", "wandb.mode=disabled"))
    status = run_in_process(monkeypatch, train, "--config-name", "smoke", f"output_dir={tmp_path}",
                            f"data.cache_dir={tmp_path / 'cache'}", "eval.benchmark=mat500")
    stderr = capsys.readouterr().err
    assert status == 1 and "unknown benchmark 'mat500'" in stderr, stderr[-2000:]
    assert not (tmp_path / "cache").exists()  # failed before touching the data
