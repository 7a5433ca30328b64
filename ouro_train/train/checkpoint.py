"""Saving and restoring a training run's checkpoints (layout: `ouro_train.run_dir`).

A checkpoint is DeepSpeed's `engine.save_checkpoint` plus the `TrainState`: its per-rank part (loader
position, RNG) in one file per rank, its global part with the run's metadata in `trainer_state.json`.
The `COMPLETE` marker is written last, after every rank has finished: a directory without it (a crash or
a kill mid-write) is never a resume point, and is deleted when that step is saved again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ouro_train.run_dir import (
    COMPLETE,
    RunDir,
    checkpoint_tag,
    is_complete,
    rank_state_file,
    trainer_state_file,
)
from ouro_train.train.state import PER_RANK, TrainState


def resolve_resume(resume: str, run_dir: RunDir) -> Path | None:
    """`auto`: the newest complete checkpoint of the run, if any; `none`; or an explicit directory."""
    if resume == "none":
        return None
    if resume == "auto":
        return run_dir.newest_checkpoint()
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint directory (no {COMPLETE} marker)")
    return path


def save(engine, run_dir: RunDir, state: TrainState, metadata: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. `metadata` (world size, config, ...) goes to trainer_state.json."""
    path = run_dir.checkpoint(state.step)
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale partial write of the same step
    dist.barrier()
    engine.save_checkpoint(str(run_dir.checkpoints_dir), tag=checkpoint_tag(state.step), save_latest=False)
    everything = state.state_dict()
    torch.save({k: everything[k] for k in PER_RANK}, rank_state_file(path, rank))
    dist.barrier()
    if rank == 0:
        shared = {k: v for k, v in everything.items() if k not in PER_RANK}
        trainer_state_file(path).write_text(json.dumps({**shared, **metadata}, indent=2))
        (path / COMPLETE).touch()
        for old in run_dir.complete_checkpoints()[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return path


def load(engine, path: Path, state: TrainState) -> dict:
    """Restore the engine and `state` from `path`; returns the checkpoint's trainer_state.json."""
    saved = json.loads(trainer_state_file(path).read_text())
    if saved["world_size"] != dist.get_world_size():
        raise RuntimeError(
            f"{path} was written by {saved['world_size']} processes; this run has "
            f"{dist.get_world_size()}: resume with the same number of processes"
        )
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    per_rank = torch.load(rank_state_file(path, dist.get_rank()), weights_only=False)
    state.load_state_dict({**saved, **per_rank})
    return saved
