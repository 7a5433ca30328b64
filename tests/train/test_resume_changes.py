"""A resume compares the checkpoint's settings with the new command's: a changed learning rate, a longer
cosine schedule or other data of the same size stop it before loading, naming `key: old → new`; benign
changes and a longer constant schedule go through, logged; `resume_allow_changes` lets an operator
change the trajectory on purpose, and then the change is applied and recorded."""

import json
import math

import pytest

from conftest import REPO_ROOT
from train_helpers import metrics, run_train
from ouro_train.run_dir import RunDir, trainer_state_file
from ouro_train.train.resume_check import _flatten

ROWS = (REPO_ROOT / "data" / "samples" / "chat.jsonl").read_text().splitlines()
LR, MIN_RATIO, WARMUP = 3e-3, 0.1, 4  # the smoke recipe's schedule


def args(output_dir, data_cache, data, *extra):
    return (f"output_dir={output_dir}", f"data.cache_dir={data_cache}", "data.sources=[]", f"data.train_files=[{data}]",
            "checkpoint.every_n_steps=2", "checkpoint.keep_last=0", "export_at_end=false", "wandb.mode=disabled",
            "max_steps=8", *extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_cache):
    """An 8-step run (checkpoints every 2 steps) on 40 conversations; tests resume from its step 4."""
    root = tmp_path_factory.mktemp("base")
    data = root / "chat.jsonl"
    data.write_text("\n".join(ROWS[:40]) + "\n")
    run_train(*args(root / "run", data_cache, data))
    return root


def resume(base, data_cache, out, *extra, check=True):
    step4 = RunDir(base / "run").checkpoint(4)
    return run_train(*args(out, data_cache, base / "chat.jsonl", f"resume={step4}", *extra), check=check)


def refused_lines(proc) -> list[str]:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout and "parameters:" not in proc.stdout  # stopped before the model
    err = proc.stderr[proc.stderr.index("error: resume from"):].splitlines()
    return [line.strip() for line in err[1:] if line.startswith("  ")]


def test_a_changed_lr_stops_the_resume_before_loading(base, data_cache, tmp_path):
    proc = resume(base, data_cache, tmp_path / "r", "optim.lr=1e-2", check=False)
    assert refused_lines(proc) == ["optim.lr: 0.003 → 0.01"]
    assert "resume_allow_changes=[optim.lr]" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_an_allowed_lr_change_is_applied_and_recorded(base, data_cache, tmp_path):
    out = tmp_path / "r"
    proc = resume(base, data_cache, out, "optim.lr=1e-2", "resume_allow_changes=[optim.lr]", "export_at_end=true")
    assert "trajectory-defining settings changed at step 4: optim.lr: 0.003 → 0.01" in proc.stdout
    lr = metrics(out)
    for step in range(5, 9):  # the smoke schedule (4 warmup steps, cosine to 0.1 over 8) at the new peak
        progress = (step - 1 - WARMUP) / (8 - WARMUP)
        expected = 1e-2 * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr[step]["lr"] == pytest.approx(expected, rel=1e-12), step
    assert metrics(base / "run")[5]["lr"] == pytest.approx(LR, rel=1e-12)  # the old run's rate at that step
    state = json.loads(trainer_state_file(RunDir(out).checkpoint(8)).read_text())
    assert state["config"]["optim"]["lr"] == 1e-2
    assert state["config_changes"] == [{"step": 4, "changes": {"optim.lr": [0.003, 0.01]}}]
    card = (out / "export" / "README.md").read_text()
    assert "Changed when resumed at step 4: `optim.lr` 0.003 → 0.01" in card


def test_more_steps_under_a_cosine_schedule_are_refused(base, data_cache, tmp_path):
    proc = resume(base, data_cache, tmp_path / "r", "max_steps=10", check=False)
    [line] = refused_lines(proc)
    assert line.startswith("max_steps: 8 → 10  (the total optimizer steps go 8 → 10")


def test_other_data_of_the_same_row_count_is_refused(base, data_cache, tmp_path):
    data = base / "chat.jsonl"
    original = data.read_text()
    data.write_text("\n".join(ROWS[40:80]) + "\n")  # the same path, as many rows, other conversations
    try:
        proc = resume(base, data_cache, tmp_path / "r", check=False)
    finally:
        data.write_text(original)
    [line] = refused_lines(proc)
    assert line.startswith("data.content: ")
    old, new = line[len("data.content: "):].split(" → ")
    assert old != new and len(old) == len(new) == 64


def test_a_constant_schedule_extends_and_benign_changes_are_applied(data_cache, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(ROWS[:40]) + "\n")
    constant = ("optim.min_lr_ratio=1.0", "optim.warmup_steps=1")
    run_train(*args(tmp_path / "run", data_cache, data, "max_steps=2", *constant))
    proc = run_train(*args(tmp_path / "run", data_cache, data, "max_steps=4", "checkpoint.every_n_steps=1",
                           "train.max_bad_steps=5", *constant))
    assert ("resume applies changed settings: checkpoint.every_n_steps: 2 → 1; max_steps: 2 → 4; "
            "train.max_bad_steps: 3 → 5") in proc.stdout
    rates = metrics(tmp_path / "run")
    assert [rates[s]["lr"] for s in (1, 2, 3, 4)] == [LR] * 4
    assert [p.name for p in RunDir(tmp_path / "run").complete_checkpoints()] == [
        "step-00000002", "step-00000003", "step-00000004"]


def test_the_comparison_flattens_sections_and_lists_of_sources():
    config = {"optim": {"lr": 1.0, "betas": [0.9, 0.95]}, "data": {"sources": [{"name": "a", "path": "x"}]}}
    assert _flatten(config) == {"optim.lr": 1.0, "optim.betas": [0.9, 0.95], "data.sources.0.name": "a",
                                "data.sources.0.path": "x"}


def test_an_unknown_allowed_key_is_refused(base, data_cache, tmp_path):
    proc = resume(base, data_cache, tmp_path / "r", "resume_allow_changes=[optim.lrr]", check=False)
    assert proc.returncode == 1
    assert "error: resume_allow_changes: 'optim.lrr' is no setting" in proc.stderr
