"""One run per output_dir: a second `ouro-train` into a directory a live run holds is refused with one
line naming the holder; the lock goes with its holder, however that ends."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from train_helpers import ENV, run_train, train_command
from ouro_train.run_dir import RunDir
from ouro_train.train import run_lock

HANG_GUARD = 1800


def hold_in_child(root):
    """A process that takes `root`'s run lock and sleeps; returns it once it holds the lock."""
    code = f"from ouro_train.train import run_lock; run_lock.hold({str(root)!r}); print('held', flush=True); " \
           "import time; time.sleep(3600)"
    child = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_lock_refuses_another_process_and_goes_with_its_holder(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(run_lock.RunDirInUse, match=rf"in use by another run \(host .*, pid {child.pid}, since "):
            run_lock.hold(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert run_lock.hold(tmp_path) == RunDir(tmp_path).lock_file  # a killed holder leaves nothing stale
    assert run_lock.hold(tmp_path) == RunDir(tmp_path).lock_file  # the holder itself may ask again


def test_a_second_ouro_train_into_a_live_runs_output_dir_is_refused(tmp_path, data_cache):
    args = (f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled", "export_at_end=false",
            "checkpoint.every_n_steps=2", "checkpoint.keep_last=1")
    first = subprocess.Popen(train_command(*args, "max_steps=100000"), env=ENV, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "metrics.jsonl"
        deadline = time.time() + HANG_GUARD
        while not log.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        second = run_train(*args, "max_steps=4", check=False, timeout=HANG_GUARD)
        assert first.poll() is None, "the second run disturbed the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    last = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 1, second.stderr[-3000:]
    assert last.startswith(f"error: output_dir {tmp_path} is in use by another run (host ") and \
        f", pid {first.pid}, since " in last and str(RunDir(tmp_path).lock_file) in last, last
