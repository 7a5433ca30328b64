"""`ouro-train` as users run it: the console script and the deepspeed launcher, resume after a kill,
SIGTERM, and the recipe/override checks (those through the console script's code in this process, one of
them also as a real process)."""

import json
import signal
import subprocess
import time

import pytest

from train_helpers import ENV, metrics, run_train, train_command
from conftest import HANG_GUARD_S, REPO_ROOT, run_in_process
from ouro_train.cli import train
from ouro_train.run_dir import COMPLETE, RunDir


def base(tmp_path, data_cache, *extra):
    return (f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled", "export_at_end=false",
            *extra)


def test_resume_after_kill_reproduces_the_trajectory_bit_for_bit(tmp_path, data_cache):
    args = ("max_steps=8", "checkpoint.every_n_steps=4", "checkpoint.keep_last=0", "deepspeed=zero2")
    run_train(*base(tmp_path / "straight", data_cache, *args))
    reference = metrics(tmp_path / "straight")

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_command(*base(run_dir, data_cache, *args)), env=ENV, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = RunDir(run_dir).checkpoint(4) / COMPLETE
    deadline = time.time() + HANG_GUARD_S
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never completed its step-4 checkpoint"
    assert not (RunDir(run_dir).checkpoint(8) / COMPLETE).exists()

    run_train(*base(run_dir, data_cache, *args))  # the same command resumes from step 4
    resumed = metrics(run_dir)
    # Bitwise: both processes run the same kernels on the same values in DeepSpeed's own (allocator-aligned)
    # buffers, so any difference is state the resume lost.
    for step in range(5, 9):
        for key in ("loss", "grad_norm", "lr", "loss_step1", "loss_step3", "exit_entropy", "supervised_tokens"):
            assert resumed[step][key] == reference[step][key], f"step {step} {key}"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_cache):
    endless = base(tmp_path, data_cache, "max_steps=100000", "checkpoint.every_n_steps=100000")
    proc = subprocess.Popen(train_command(*endless), env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + HANG_GUARD_S
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, output[-3000:]
    saved = RunDir(tmp_path).complete_checkpoints()
    assert len(saved) == 1
    assert int(saved[0].name.split("-")[1]) == max(metrics(tmp_path))
    assert "checkpoint saved" in output


def test_two_processes_learn_under_zero3_and_the_deepspeed_launcher(tmp_path, data_cache):
    """ZeRO-3 with parameters really partitioned, under the deepspeed launcher, with activation
    checkpointing of the recurrent steps and of the layers inside them. (Two processes under torchrun and
    ZeRO-2 take the one-process trajectory exactly: test_resume_topology, test_sequence_parallel.)"""
    run_train(*base(tmp_path, data_cache, "max_steps=12", "deepspeed=zero3",
                    "deepspeed.stage3_param_persistence_threshold=0", "model.checkpointing=step+layer",
                    "train.global_batch_size=4"), nproc=2, launcher="deepspeed")
    records = metrics(tmp_path)
    first, last = sum(records[s]["loss"] for s in (1, 2, 3)), sum(records[s]["loss"] for s in (10, 11, 12))
    assert last < first - 0.3, (first, last)
    assert all(records[s]["step_applied"] for s in records)


def test_a_bad_setting_exits_with_one_line_before_any_work(tmp_path):
    """The process boundary: exit status 1 and the field named on stderr, before the data data_cache is touched."""
    bad = run_train(f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "optim.lr=0", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "error: optim.lr: must be > 0, got 0.0"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


def test_print_resolved_config(monkeypatch, capsys):
    assert run_in_process(monkeypatch, train, "--config-name", "smoke", "--cfg", "job") == 0
    shown = capsys.readouterr().out
    assert "zero_stage: 2" in shown and "objective:" in shown


def test_compute_plan_of_the_thinking_recipe(tmp_path, monkeypatch, capsys):
    """dry_run needs neither weights nor data: the thinking mix names every count."""
    assert run_in_process(monkeypatch, train, "--config-name", "thinking_sft", "dry_run=true", "plan.gpus=32",
                          "plan.estimate_memory=false", f"output_dir={tmp_path}") == 0
    out = capsys.readouterr().out
    assert "8,275,000" in out  # 3.5M + 3.2M + 808K + 767K examples
    assert "128 sequences = 4,194,304 tokens" in out
    assert "tok/s per GPU × 32 GPUs" in out and "bench/results" not in out
    assert "from 2026-11-23_h100_upstream_reference.json" in out  # the recorded MFU, not a recipe constant
    assert json.loads((tmp_path / "plan.json").read_text())["optimizer_steps"] > 0
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1e-4", "Could not override 'optim.learning_rate'"),
        ("model.init=pretrained", "model.path=None is not a checkpoint directory"),
        ("train.global_batch_size=3", "not a multiple of train.micro_batch_size"),
        ("deepspeed.offload_params=true", "deepspeed.offload_params: needs zero_stage 3"),
        ("export.remote_code=/nonexistent", "/nonexistent/configuration_ouro.py not found: export.remote_code needs"),
        ("lora.loraplus_lr_ratio=16", "lora.loraplus_lr_ratio: needs lora.enabled=true"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, monkeypatch, capsys, override, message):
    status = run_in_process(monkeypatch, train, "--config-name", "smoke", f"output_dir={tmp_path}",
                            f"data.cache_dir={tmp_path / 'cache'}", override)
    stderr = capsys.readouterr().err
    assert status == 1 and message in stderr, stderr[-2000:]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()  # before the data


def test_the_plan_refuses_a_batch_the_trainer_refuses():
    """One batch geometry for both: 6 sequences cannot split into micro-batches of 2 on 2 GPUs."""
    from ouro_train.train.plan import compute_plan
    from train_helpers import compose_run

    with pytest.raises(ValueError, match="not a multiple of train.micro_batch_size × world size = 2 × 2"):
        compute_plan(compose_run("train.global_batch_size=6", "plan.gpus=2"))
    plan = compute_plan(compose_run("train.global_batch_size=8", "plan.gpus=2"))
    assert plan["sequences_per_step"] == 8
