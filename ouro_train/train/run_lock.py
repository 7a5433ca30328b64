"""One run per `output_dir`: rank 0 holds an exclusive `flock` on `output_dir/run.lock` for as long as its
process lives (the kernel releases it when the process ends, however it ends, so a killed run leaves no
stale lock). The file names the holder's host and pid, for the message a second run gets."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from ouro_train.run_dir import RunDir


class RunDirInUse(ValueError):
    """Another live run holds the output directory; `ouro-train` prints the message and exits 1."""


_held: dict[Path, int] = {}  # lock file -> descriptor, open until the process ends


def hold(root: str | Path) -> Path:
    """Take `root`'s run lock for the rest of this process (again in the same process: a no-op)."""
    path = RunDir(root).lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise RunDirInUse(f"output_dir {Path(root)} is in use by another run ({holder}; lock {path}): "
                          "wait for it to end or choose another output_dir") from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
    _held[key] = fd
    return path


def hold_for_run(root: str | Path) -> None:
    """Collective: rank 0 takes the lock; if it cannot, every rank raises (none is left waiting for it)."""
    message = [None]
    if dist.get_rank() == 0:
        try:
            hold(root)
        except RunDirInUse as e:
            message[0] = str(e)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise RunDirInUse(message[0])
