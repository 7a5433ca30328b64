"""A checkpoint in DeepSpeed's universal format, for a resume on another number of processes or ZeRO stage.

DeepSpeed's `ds_to_universal` rewrites the ZeRO-1/2 shards as one set of files per parameter (fp32 master
weights and Adam moments), which a ZeRO-1/2 engine of any world size loads with
`"checkpoint": {"load_universal": true}` (ZeRO-3: see `checkpoint.needs_universal`). It runs once per
checkpoint, on rank 0, into `universal.tmp` beside the shards; the COMPLETE marker is written last and the directory is then renamed to `universal`,
so a conversion killed at any moment leaves nothing that counts, and the next attempt starts over.
"""

from __future__ import annotations

import os
import shutil
import time
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

from ouro_train.run_dir import (
    COMPLETE,
    is_complete,
    latest_universal_file,
    universal_dir,
    universal_tmp_dir,
)


def ensure_universal(checkpoint: Path, log=print) -> Path:
    """Collective: the universal copy of `checkpoint`, converted by rank 0 unless it already exists."""
    target = universal_dir(checkpoint)
    if dist.get_rank() == 0 and not is_complete(target):
        start = time.perf_counter()
        convert(checkpoint)
        log(f"converted {checkpoint} to DeepSpeed's universal format in {time.perf_counter() - start:.1f} s "
            f"({disk_size(target) / 2**20:.1f} MiB in {target})")
    dist.barrier()
    return target


def convert(checkpoint: Path) -> Path:
    """`checkpoint` (a complete ZeRO-1/2 checkpoint) to `checkpoint/universal`, atomically."""
    from deepspeed.checkpoint import ds_to_universal

    tmp, target = universal_tmp_dir(checkpoint), universal_dir(checkpoint)
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed
    ds_to_universal.main(Namespace(
        input_folder=str(checkpoint), output_folder=str(tmp),
        num_extract_workers=1, num_merge_workers=1,  # no worker processes inside a training process
        keep_temp_folder=False, strict=True,
        inject_missing_state=True,  # our module declares no tensor-parallel patterns: there are none
    ))
    latest_universal_file(tmp).unlink(missing_ok=True)  # resume names the directory itself
    (tmp / COMPLETE).touch()
    os.replace(tmp, target)
    return target


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
