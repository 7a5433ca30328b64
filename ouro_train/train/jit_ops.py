"""DeepSpeed's ops that are compiled on first use (JIT), and the build lock that can hang every later run.

torch builds such an op under `TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions/…/<op>/`)
holding a `lock` file (torch's FileBaton) that it removes when done; a process killed mid-build leaves
it, and every later build of that op on the machine waits for it forever, printing nothing. So:

- The CPU accelerator's shared-memory collectives op, which DeepSpeed builds when its process group
  starts, serves only `inference_all_reduce`, which training never calls: it is marked not compatible
  and never built (gloo runs every collective, as it does without the op).
- An op the DeepSpeed config needs (CPU Adam under optimizer offload; FusedAdam where the GPU optimizer
  is DeepSpeed's own) is built before the engine, one process at a time per build directory (an
  `flock` on `lock.owner` beside torch's lock, naming the builder's host and pid). Holding it, a torch
  `lock` that no process has open is stale (torch's builder keeps it open while it builds), and is
  reported with its path and removed. A lock held by a process outside this protocol on this host is
  waited for, said once; one held from another host (a shared home directory) cannot be seen from here.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

BATON = "lock"  # torch.utils.cpp_extension's FileBaton in the op's build directory
OWNER = "lock.owner"


def skip_shm_comm_op() -> None:
    """Before DeepSpeed's process group starts: never build the shared-memory collectives op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def needed_ops(ds_config: dict, on_gpu: bool) -> list[str]:
    """The op builders DeepSpeed will load for this config's optimizer (as its engine chooses one)."""
    params = ds_config.get("optimizer", {}).get("params", {})
    if params.get("torch_adam"):
        return []
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        return ["CPUAdamBuilder"]
    return ["FusedAdamBuilder"] if on_gpu else []


def build_needed_ops(ds_config: dict, on_gpu: bool, log: Callable[[str], None] = print) -> None:
    """Build (or load the built) ops `ds_config` needs, each under `build_guard`: DeepSpeed then finds
    them loaded."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    for name in needed_ops(ds_config, on_gpu):
        builder = get_accelerator().create_op_builder(name)
        if builder is None or installed_ops.get(builder.name, False):
            continue  # compiled when DeepSpeed was installed (DS_BUILD_...=1): nothing is built
        with build_guard(builder.name, log):
            builder.load(verbose=False)


def build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextmanager
def build_guard(name: str, log: Callable[[str], None] = print, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold op `name`'s build directory for this process, its stale torch lock removed (see above)."""
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / OWNER, "a+") as owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner.seek(0)
            log(f"waiting for {owner.read().strip() or 'another process'} to finish building DeepSpeed's {name} "
                f"op in {directory}")
            fcntl.flock(owner, fcntl.LOCK_EX)
        owner.seek(0)
        owner.truncate()
        owner.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        owner.flush()
        clear_stale_lock(directory / BATON, log, poll_s)
        yield directory


def clear_stale_lock(baton: Path, log: Callable[[str], None] = print, poll_s: float = 1.0) -> None:
    """Wait while a live process on this host holds `baton`; remove it once none does."""
    said = False
    while baton.exists():
        holders = processes_holding(baton)
        if holders:
            if not said:
                log(f"waiting for process {', '.join(map(str, holders))}, which holds the build lock {baton}")
                said = True
            time.sleep(poll_s)
            continue
        time.sleep(poll_s)  # a builder may be between closing its lock and removing it
        if baton.exists() and not processes_holding(baton):
            log(f"removing a stale build lock {baton}: no process holds it (a build of this op was killed); "
                "building again")
            baton.unlink(missing_ok=True)


def processes_holding(path: Path) -> list[int]:
    """Pids of the processes on this host with `path` open (those /proc lets this user see)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return []
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).endswith(f"/{path.name}"):
                    st = os.stat(fd)
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        holders.append(int(proc.name))
                        break
        except OSError:  # gone, or not ours to read
            continue
    return holders
