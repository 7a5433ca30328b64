"""No silent hang on DeepSpeed's JIT-built ops: the CPU shared-memory collectives op is never built, and a
build lock left by a build that was killed is reported with its path and removed, so the next run builds
(torch's own builder waits for that lock forever). Each test has its own TORCH_EXTENSIONS_DIR."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from train_helpers import ENV, train_command
from ouro_train.train import jit_ops

HANG_GUARD = 1800
OP = "cpu_adam"  # the op a CPU run with deepspeed.offload_optimizer=true builds


def baton_owner(lock, *, then: str) -> subprocess.Popen:
    """A process that takes `lock` as torch's builder does (FileBaton), then `then` ('die' or 'wait')."""
    end = "os.kill(os.getpid(), signal.SIGKILL)" if then == "die" else "print('held', flush=True); time.sleep(3600)"
    code = ("import os, signal, time; from torch.utils.file_baton import FileBaton; "
            f"assert FileBaton({str(lock)!r}).try_acquire(); {end}")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return tmp_path / "extensions"


def test_the_shared_memory_collectives_op_is_not_built(extensions):
    code = ("from ouro_train.train.engine import init_distributed; init_distributed(); "
            "from deepspeed.comm import comm; print('op:', comm.cdb.shm_comm_op)")
    proc = subprocess.run([sys.executable, "-c", code], env={**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "op: None" in proc.stdout
    assert not (extensions / "deepspeed_shm_comm").exists()


def test_a_lock_left_by_a_killed_build_is_named_and_removed(extensions):
    lock = jit_ops.build_directory(OP) / jit_ops.BATON
    owner = baton_owner(lock, then="die")
    assert owner.wait(timeout=HANG_GUARD) == -signal.SIGKILL and lock.exists()  # as a kill mid-build leaves it
    said = []
    with jit_ops.build_guard(OP, log=said.append, poll_s=0.05):
        from torch.utils.file_baton import FileBaton

        assert FileBaton(str(lock)).try_acquire()  # what torch's build does first: it builds now
    assert said == [f"removing a stale build lock {lock}: no process holds it (a build of this op was killed); "
                    "building again"]


def test_a_live_build_is_waited_for_then_a_lock_it_leaves_is_removed(extensions):
    lock = jit_ops.build_directory(OP) / jit_ops.BATON
    owner = baton_owner(lock, then="wait")
    assert owner.stdout.readline().strip() == "held"
    said = []
    guard = threading.Thread(target=lambda: jit_ops.clear_stale_lock(lock, said.append, poll_s=0.05))
    guard.start()
    deadline = time.time() + HANG_GUARD
    while not said and time.time() < deadline:
        time.sleep(0.05)
    assert said == [f"waiting for process {owner.pid}, which holds the build lock {lock}"] and lock.exists()
    owner.send_signal(signal.SIGKILL)  # killed mid-build: the lock stays
    owner.wait()
    guard.join(timeout=HANG_GUARD)
    assert not guard.is_alive() and not lock.exists()
    assert said[-1].startswith(f"removing a stale build lock {lock}")


def test_a_run_killed_inside_the_build_does_not_hang_the_next(tmp_path, data_cache, extensions):
    """The real thing: `ouro-train` with optimizer offload (DeepSpeed's CPU Adam, JIT-built) killed while it
    compiles; the same command then builds and trains."""
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)}
    command = train_command(f"output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}", "max_steps=1",
                            "deepspeed.offload_optimizer=true", "wandb.mode=disabled", "export_at_end=false")
    lock = extensions / OP / jit_ops.BATON
    first = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + HANG_GUARD
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the run and its compilers, mid-build
    first.wait()
    assert lock.exists(), "the first run was not inside the build"
    second = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"removing a stale build lock {lock}: no process holds it" in second.stdout
    assert not lock.exists() and (tmp_path / "run" / "checkpoints").is_dir()
