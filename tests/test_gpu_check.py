"""bench/gpu_check.sh on the CPU: every row end to end at tiny shapes through the code the GPU runs, a row
made to fail and one made to hang, the memory each row hands back, the dry run and the time budget."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

GOAL_ORDER = ["matmul-peak", "ours-8k", "ours-32k", "baseline-8k", "baseline-32k", "upstream-8k", "upstream-32k",
              "cuda-tests", "ours-4k", "baseline-4k", "ours-16k", "baseline-16k", "lora-8k", "ours-32k-layer",
              "ours-8k-compiled"]


def upstream_stand_in(directory):
    """Files under upstream's names that define the upstream classes on top of ours (the real remote code is
    never part of the project): enough to check how the check finds and loads them."""
    directory.mkdir()
    (directory / "configuration_ouro.py").write_text(
        "from ouro_train.model.configuration import OuroConfig as _Ours\n\n\n"
        "class OuroConfig(_Ours):\n    model_type = 'ouro'\n")
    (directory / "modeling_ouro.py").write_text(
        "from ouro_train.model.modeling import OuroForCausalLM as _Ours\n\n"
        "from .configuration_ouro import OuroConfig\n\n\n"
        "class OuroForCausalLM(_Ours):\n    config_class = OuroConfig\n")
    return directory


def gpu_check(*args, env=None, out=None):
    env = dict(os.environ if env is None else env, PYTHON=sys.executable, OUT=str(out))
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)


def test_the_dry_run_lists_the_rows_in_the_goals_order_and_runs_nothing(tmp_path):
    env = dict(os.environ, OURO_UPSTREAM_CODE=str(tmp_path / "upstream"))
    proc = gpu_check("--dry-run", env=env, out=tmp_path / "out")
    assert proc.returncode == 2 and "OURO_UPSTREAM_CODE=" in proc.stderr and "missing: configuration_ouro.py" \
        in proc.stderr  # a wrong folder is said before anything runs
    upstream_stand_in(tmp_path / "upstream")
    proc = gpu_check("--dry-run", env=env, out=tmp_path / "out")  # not taken for a wheel folder
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert rows == GOAL_ORDER
    assert "--seq" not in proc.stdout and '"seq": 32768' in proc.stdout and '"shape": "1.4b"' in proc.stdout
    assert not (tmp_path / "out").exists()


def test_cpu_mode_runs_every_row_and_reports_a_failed_and_a_hung_row(tmp_path):
    env = dict(os.environ, OURO_UPSTREAM_CODE=str(upstream_stand_in(tmp_path / "upstream")))
    out = tmp_path / "out"
    proc = gpu_check("--cpu", "--inject", "fail:ours-4k", "--inject", "hang:lora-8k", env=env, out=out)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a failed row fails the check

    lines = (out / "gpu_check.jsonl").read_text().splitlines()
    rows = {r["name"]: r for r in map(json.loads, lines)}
    assert [json.loads(line)["name"] for line in lines] == GOAL_ORDER  # one line per row, in order

    failed = rows.pop("ours-4k")
    assert (failed["status"], failed["phase"], failed["exit_status"]) == ("failed", "step", 1)
    assert failed["error"] == "RuntimeError: injected failure in row ours-4k"
    hung = rows.pop("lora-8k")
    assert hung["status"] == "timeout" and hung["exit_status"] != 0 and "time limit" in hung["error"]
    assert all(r["status"] == "ok" for r in rows.values()), {n: r.get("error") for n, r in rows.items()}

    tests = rows.pop("cuda-tests")  # tests/cuda collected without import errors, every test skipped
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and tests["failed_tests"] == []
    peak = rows.pop("matmul-peak")["matmul_peak_flops"]
    for name, r in rows.items():
        assert r["checkpointing_used"] == r["checkpointing"] and r["compile_used"] == r["compile"], name
        assert r["optimizer"] == "AdamW", name
        # random weights on uniform random tokens: the loss of a uniform guess over the 512-token vocabulary
        assert r["first_loss"] == pytest.approx(math.log(512), abs=0.5), name
        assert r["mfu_measured_peak"] == pytest.approx(r["tok_per_s"] * r["flops_per_token"] / peak), name
        assert r["live_gib_after"] <= r["live_gib_before"] + 0.05, name  # the engine's memory came back
        assert "stragglers_killed" not in r, name  # nothing of the row outlived it
    assert rows["upstream-8k"]["model_class"] == "ouro_upstream_code.modeling_ouro.OuroForCausalLM"
    assert rows["ours-8k"]["model_class"] == "ouro_train.model.modeling.OuroForCausalLM"
    assert rows["ours-8k-compiled"]["compile_used"] is True

    report = json.loads((out / "gpu_check.json").read_text())["results"]
    by_name = {r["name"]: r for r in report}
    for length in ("8k", "32k"):
        ours, base = by_name[f"ours-{length}"], by_name[f"baseline-{length}"]
        assert ours["vs_baseline"] == pytest.approx(ours["tok_per_s"] / base["tok_per_s"])
    table = proc.stdout.strip().splitlines()
    assert table[-1] == "FAILED: 2 of 15 rows (ours-4k failed, lora-8k timeout)"
    assert any(line.startswith("ours-4k") and "in step (exit 1): RuntimeError: injected failure" in line
               for line in table)


def test_a_spent_time_budget_writes_every_row_as_not_run(tmp_path):
    proc = gpu_check("--cpu", "--deadline", "0", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and {r["status"] for r in rows} == {"not run: time budget"}
    assert not (tmp_path / "rows").exists()
    assert "13 not run (time budget; deadline 0 s)" in proc.stdout


def test_a_stopped_check_kills_its_running_row_and_keeps_it(tmp_path):
    """SIGTERM (a job's time limit) while a row runs: the row, in its own session, is killed and written
    as interrupted, the later rows as not run, and the check fails."""
    import psutil

    driver = subprocess.Popen([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--cpu", "--rows",
                               "ours-8k", "baseline-8k", "--inject", "hang:ours-8k"], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "rows" / "ours-8k.log"
    for _ in range(9000):  # hang guard: 1800 s
        if log.exists() or driver.poll() is not None:
            break
        time.sleep(0.2)
    time.sleep(2)  # the row's process is started and the check waits on it
    row = [p for p in psutil.Process(driver.pid).children(recursive=True)]
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=1800)
    assert driver.returncode == 1, out
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["interrupted", "not run: interrupted"]
    assert rows[0]["exit_status"] == -signal.SIGKILL
    assert row and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in row)
    assert out.strip().splitlines()[-1] == "FAILED: 1 of 2 rows (ours-8k interrupted)"


def test_a_missing_pytest_report_or_a_failed_test_is_an_error(tmp_path):
    from gpu_check import pytest_summary

    assert pytest_summary(tmp_path / "none.xml") == {"error": "pytest wrote no report"}
    (tmp_path / "report.xml").write_text(
        '<testsuites><testsuite tests="3" skipped="1"><testcase classname="test_cuda" name="test_a"/>'
        '<testcase classname="test_cuda" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="test_cuda" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    assert pytest_summary(tmp_path / "report.xml") == dict(tests=3, skipped=1, failed_tests=["test_cuda.test_b"],
                                                          error="1 failed: test_cuda.test_b")


def test_the_upstream_code_folder_must_hold_both_files(tmp_path):
    from train_throughput import load_upstream

    (tmp_path / "modeling_ouro.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"OURO_UPSTREAM_CODE=.*missing: configuration_ouro.py"):
        load_upstream(str(tmp_path))


def test_live_memory_sees_an_engine_kept_alive_and_its_release_by_destroy():
    """Why rows destroy their engines: DeepSpeed keeps a dropped engine's parameters referenced."""
    import deepspeed

    from common import live_tensor_gib
    from ouro_train.config import DeepSpeedConfig, OptimConfig
    from ouro_train.train.engine import build_ds_config, init_distributed, param_groups

    init_distributed()
    config = build_ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(), micro_batch=1, grad_accum=1, world_size=1)

    def engine_step():
        model = torch.nn.Linear(512, 512)  # 1 MiB of weights; Adam states and master copies on top
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config)
        engine.backward(engine(torch.ones(1, 512)).sum())
        engine.step()
        return engine

    cpu = torch.device("cpu")
    before = live_tensor_gib(cpu)
    engine = engine_step()
    assert live_tensor_gib(cpu) - before > 2 / 1024
    engine.destroy()
    del engine
    assert live_tensor_gib(cpu) - before < 0.1 / 1024
    engine = engine_step()
    del engine  # dropped, not destroyed
    assert live_tensor_gib(cpu) - before > 2 / 1024
