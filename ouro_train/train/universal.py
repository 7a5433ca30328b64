"""A checkpoint in DeepSpeed's universal format, for a resume on another number of processes or ZeRO stage.

DeepSpeed's `ds_to_universal` rewrites the ZeRO shards as one set of files per parameter (fp32 master
weights and Adam moments), which an engine of any world size and ZeRO stage (1-3) loads with
`"checkpoint": {"load_universal": true}`. It runs once per checkpoint, on rank 0, into `universal.tmp`
beside the shards; the COMPLETE marker is written last and the directory is then renamed to `universal`,
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
    model_states_aliases,
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
    """`checkpoint` (a complete ZeRO 1-3 checkpoint) to `checkpoint/universal`, atomically."""
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
    _alias_model_states(tmp)
    (tmp / COMPLETE).touch()
    os.replace(tmp, target)
    return target


def _alias_model_states(universal: Path) -> None:
    """Make the module states file findable under both stage families' names (a hard link, no copy)."""
    below_3, stage_3 = model_states_aliases(universal)
    have, missing = (below_3, stage_3) if below_3.is_file() else (stage_3, below_3)
    if not missing.exists():
        os.link(have, missing)


def disk_size(path: Path) -> int:
    """Bytes under `path`, each hard-linked file once."""
    files = {(s.st_dev, s.st_ino): s.st_size for s in (f.stat() for f in path.rglob("*") if f.is_file())}
    return sum(files.values())
