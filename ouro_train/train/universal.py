"""A checkpoint in DeepSpeed's universal format, for a resume on another number of processes or ZeRO stage.

DeepSpeed's `ds_to_universal` rewrites the ZeRO-1/2/3 shards as one set of files per parameter (fp32
master weights and Adam moments), which an engine of any world size and ZeRO stage 1-3 loads with
`"checkpoint": {"load_universal": true}`. DeepSpeed 0.19.8 writes two layouts, one for ZeRO-1/2 sources
and one for ZeRO-3 ones, and each stage's loader reads only its own: `_loadable_under_every_stage` gives
the copy both, so ZeRO-1/2 <-> ZeRO-3 work too. The conversion runs once per checkpoint, on rank 0, into
`universal.tmp` beside the shards; the COMPLETE marker is written last and the directory is then renamed
to `universal`, so a conversion killed at any moment leaves nothing that counts, and the next attempt
starts over.
"""

from __future__ import annotations

import os
import shutil
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

from ouro_train.checkpoint_files import fsync, fsync_tree, load, weights_only_loads
from ouro_train.run_dir import (
    COMPLETE,
    is_complete,
    latest_universal_file,
    module_states_file,
    universal_dir,
    universal_optimizer_file,
    universal_params_dir,
    universal_step_file,
    universal_tmp_dir,
    zero3_module_states_file,
)

_OPTIM_STATE_DICT = "optimizer_state_dict"  # ZeRO-3's optimizer state inside optimizer_state.pt


def ensure_universal(checkpoint: Path, log=print) -> Path:
    """Collective: the universal copy of `checkpoint`, converted by rank 0 unless it already exists."""
    target = universal_dir(checkpoint)
    if dist.get_rank() == 0 and not is_complete(target):
        start = time.perf_counter()
        with weights_only_loads():  # DeepSpeed's converter reads every shard
            convert(checkpoint)
        log(f"converted {checkpoint} to DeepSpeed's universal format in {time.perf_counter() - start:.1f} s "
            f"({disk_size(target) / 2**20:.1f} MiB in {target})")
    dist.barrier()
    return target


def convert(checkpoint: Path) -> Path:
    """`checkpoint` (a complete ZeRO-1/2/3 checkpoint) to `checkpoint/universal`, atomically."""
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
    _loadable_under_every_stage(tmp)
    fsync_tree(tmp)
    (tmp / COMPLETE).touch()
    fsync(tmp)
    os.replace(tmp, target)
    fsync(checkpoint)
    return target


def _loadable_under_every_stage(out: Path) -> None:
    """DeepSpeed 0.19.8 writes a ZeRO-1/2 and a ZeRO-3 checkpoint's universal copy in two layouts, and
    each stage's loader reads only its own. Give `out` both: per-parameter files as {"param": tensor of
    the parameter's shape} with a step.pt beside them; optimizer_state.pt with the stage-1/2 keys and the
    stage-3 `optimizer_state_dict` (its Adam step only); the module states file under both names."""
    optim = load(universal_optimizer_file(out))
    inner = optim.get(_OPTIM_STATE_DICT)
    stage12, stage3 = module_states_file(out), zero3_module_states_file(out)
    if inner is not None:  # from ZeRO-3: flat tensors, the step only in rank 0's optimizer state
        module_states = load(stage3)
        step = inner["state"][0]["step"]
        for name, shape in ((k, v) for group in module_states["param_shapes"] for k, v in group.items()):
            for state in (universal_params_dir(out) / name).glob("*.pt"):
                torch.save({"param": load(state).view(shape)}, state)
            torch.save(step.clone() if torch.is_tensor(step) else step, universal_step_file(out, name))
        optim.pop("fp32_flat_groups", None)  # rank 0's partition, in the per-parameter files already
        optim.setdefault("ds_version", module_states["ds_version"])
        _same_file_under_another_name(stage3, stage12)
    else:  # from ZeRO-1/2: every trained parameter has its step.pt
        steps = (universal_step_file(out, p.name) for p in universal_params_dir(out).iterdir())
        step = load(next(f for f in steps if f.is_file()))
        _same_file_under_another_name(stage12, stage3)
    optim[_OPTIM_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    torch.save(optim, universal_optimizer_file(out))


def _same_file_under_another_name(src: Path, dst: Path) -> None:
    """A hard link where the filesystem has them: a ZeRO-1/2 module states file holds the whole model's
    weights (2.8 GB for Ouro-1.4B in bf16), which a copy would store twice."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def disk_size(path: Path) -> int:
    """Bytes on disk under `path`, each hard-linked file once."""
    files = {(st.st_dev, st.st_ino): st.st_size for st in (f.stat() for f in path.rglob("*") if f.is_file())}
    return sum(files.values())
