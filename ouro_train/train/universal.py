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

import torch
import torch.distributed as dist

from ouro_train.run_dir import (
    COMPLETE,
    is_complete,
    latest_universal_file,
    universal_dir,
    universal_tmp_dir,
)

# The universal format's own file names (DeepSpeed 0.19.8's ds_to_universal and its loaders).
_ZERO = "zero"
_OPTIM_STATE = "optimizer_state.pt"
_OPTIM_STATE_DICT = "optimizer_state_dict"
_STEP = "step.pt"
_MODULE_STATES = "mp_rank_00_model_states.pt"


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
    _loadable_under_every_stage(tmp)
    (tmp / COMPLETE).touch()
    os.replace(tmp, target)
    return target


def _loadable_under_every_stage(out: Path) -> None:
    """DeepSpeed 0.19.8 writes a ZeRO-1/2 and a ZeRO-3 checkpoint's universal copy in two layouts, and
    each stage's loader reads only its own. Give `out` both: per-parameter files as {"param": tensor of
    the parameter's shape} with a step.pt beside them; optimizer_state.pt with the stage-1/2 keys and the
    stage-3 `optimizer_state_dict` (its Adam step only); the module states file under both names."""
    zero = out / _ZERO
    optim = torch.load(zero / _OPTIM_STATE, weights_only=False)
    inner = optim.get(_OPTIM_STATE_DICT)
    if inner is not None:  # from ZeRO-3: flat tensors, the step only in rank 0's optimizer state
        module_states = torch.load(next(out.glob(f"zero_pp_rank_0_{_MODULE_STATES}")), weights_only=False)
        shapes = {k: v for group in module_states["param_shapes"] for k, v in group.items()}
        step = inner["state"][0]["step"]
        for name, shape in shapes.items():
            for state in (zero / name).glob("*.pt"):
                torch.save({"param": torch.load(state, weights_only=False).view(shape)}, state)
            torch.save(step.clone() if torch.is_tensor(step) else step, zero / name / _STEP)
        optim.pop("fp32_flat_groups", None)  # rank 0's partition, in the per-parameter files already
        optim.setdefault("ds_version", module_states["ds_version"])
    else:  # from ZeRO-1/2: the step is in every trained parameter's step.pt
        step = torch.load(next(zero.glob(f"*/{_STEP}")), weights_only=False)
    optim[_OPTIM_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    torch.save(optim, zero / _OPTIM_STATE)
    stage12, stage3 = out / _MODULE_STATES, out / f"zero_pp_rank_0_{_MODULE_STATES}"
    source, target = (stage12, stage3) if stage12.exists() else (stage3, stage12)
    shutil.copyfile(source, target)


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
