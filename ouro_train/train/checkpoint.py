"""Saving and restoring a training run's checkpoints (layout: `ouro_train.run_dir`).

A checkpoint is DeepSpeed's `engine.save_checkpoint` plus the `TrainState`: its per-rank part (loader
position, RNG) in one file per rank, its global part with the run's metadata in `trainer_state.json`.
The `COMPLETE` marker is written last, after every rank has finished and every file and directory is
fsynced: a directory without it (a crash or a kill mid-write) is never a resume point, and is deleted
when that step is saved again. A save first checks the free space against the last checkpoint's size,
and a full disk (then or during the write) stops the run saying so. A complete checkpoint with a damaged
file is passed over by `resume=auto` (named, with a warning) and refused by `resume=PATH`; every file is
read weights-only (`ouro_train.checkpoint_files`).

Resuming on another topology (number of processes, ZeRO stage 1, 2 or 3, offload) loads the
checkpoint's universal copy (`train/universal.py`), made once, with DeepSpeed's universal loader;
`_repair_universal_load` then puts right what that loader gets wrong. Weights, Adam moments and step,
the schedule and DeepSpeed's step counters continue exactly. ZeRO-0 checkpoints
load on any number of processes as they are, but only under ZeRO-0, and a ZeRO-0 run resumes only from
ZeRO-0 checkpoints: DeepSpeed converts partitioned (ZeRO >= 1) optimizer states only. The loader position
is counted over all ranks and carries over exactly; on another number of processes the per-rank RNG
streams cannot (no new rank continues an old rank's stream), so they are re-seeded from (seed, step, rank).
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ouro_train.checkpoint_files import (
    CheckpointFileError,
    damaged_file,
    fsync,
    fsync_tree,
    load as load_file,
    weights_only_loads,
)
from ouro_train.config import DeepSpeedConfig
from ouro_train.run_dir import (
    COMPLETE,
    UNIVERSAL,
    RunDir,
    checkpoint_tag,
    is_complete,
    rank_state_file,
    trainer_state_file,
    universal_optimizer_file,
)
from ouro_train.train.state import PER_RANK, TrainState, reseed_rng

GIB = 2**30


class NoSpaceForCheckpoint(OSError, ValueError):
    """The file system cannot hold the next checkpoint; the previous ones are left as they are. (A
    ValueError too: `ouro-train` reports it in one line.)"""


@dataclass(frozen=True)
class Topology:
    """How a run's states are laid out over processes: what a plain DeepSpeed load needs unchanged."""

    world_size: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool

    @classmethod
    def of(cls, world_size: int, ds: DeepSpeedConfig) -> "Topology":
        return cls(world_size, ds.zero_stage, ds.offload_optimizer, ds.offload_params)

    @classmethod
    def of_checkpoint(cls, path: Path) -> "Topology":
        saved = json.loads(trainer_state_file(path).read_text())
        ds = saved["config"]["deepspeed"]
        return cls(saved["world_size"], ds["zero_stage"], ds["offload_optimizer"], ds["offload_params"])

    def __str__(self) -> str:
        offload = [name for name in ("offload_optimizer", "offload_params") if getattr(self, name)]
        return f"{self.world_size} processes, ZeRO-{self.zero_stage}" + "".join(f", {o}" for o in offload)


def needs_universal(path: Path, run: Topology, *, random_frozen_base: bool = False) -> bool:
    """Whether resuming `path` on `run` goes through the universal format (False: DeepSpeed's plain load).
    Raises, before anything is loaded, where neither can work. `random_frozen_base`: the run freezes
    weights of a random init (LoRA or the gate objective on `model.init=random`), which the universal
    format does not hold: the run rebuilds them, and ZeRO-3 builds other ones than ZeRO-0/1/2."""
    saved = Topology.of_checkpoint(path)
    if saved == run:
        return False
    if saved.zero_stage == 0 and run.zero_stage == 0:
        return False  # no partitioning: every rank holds the whole optimizer state, any world size loads it
    if 0 in (saved.zero_stage, run.zero_stage):
        stages = "0" if saved.zero_stage == 0 else "1, 2 or 3"
        raise RuntimeError(
            f"{path} was written with {saved}; this run has {run}. DeepSpeed's universal format converts "
            f"between ZeRO stages 1-3 only: resume with deepspeed.zero_stage={stages}"
        )
    if random_frozen_base and (saved.zero_stage == 3) != (run.zero_stage == 3):
        raise RuntimeError(
            f"{path} was written with {saved}; this run has {run}. Its frozen weights are a random init "
            "(model.init=random), which ZeRO-3 draws differently from ZeRO-1/2: resume with "
            f"deepspeed.zero_stage={'3' if saved.zero_stage == 3 else '1 or 2'}"
        )
    return True


def _repair_universal_load(engine, universal: Path) -> None:
    """What DeepSpeed 0.19.8's universal loaders leave wrong. ZeRO-3's gives every parameter group the
    first group's hyperparameters (the no-decay group then decays) and one Adam step tensor to all groups
    (each group's update then advances it, and the bias correction runs ahead). Every stage's keeps the
    step count in the type of the optimizer that saved it: torch's Adam (CPU) counts in a tensor,
    DeepSpeed's CPU (offload) and fused Adam in an int, and each fails on the other's."""
    base = engine.optimizer.optimizer
    if engine.zero_optimization_stage() == 3:
        saved = load_file(universal_optimizer_file(universal))["param_groups"]
        if len(saved) != len(base.param_groups):
            raise RuntimeError(f"{universal}: {len(saved)} optimizer parameter groups, this run has "
                               f"{len(base.param_groups)}")
        for group, hyper in zip(base.param_groups, saved):
            group.update({k: v for k, v in hyper.items() if k != "params"})
    tensor_steps = type(base).__module__.startswith("torch.optim")
    for state in base.state.values():
        if "step" in state:  # a new object for each state: none is shared
            step = float(state["step"])
            state["step"] = torch.tensor(step, dtype=torch.float32) if tensor_steps else int(step)


def resolve_resume(resume: str, run_dir: RunDir, log=print) -> Path | None:
    """`auto`: the newest complete checkpoint of the run whose files are whole (a damaged one is named
    and passed over, with a warning), if any; `none`; or an explicit directory, which must be whole."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = run_dir.complete_checkpoints()
        for path in reversed(complete):
            problem = damaged_file(path)
            if problem is None:
                return path
            log(f"warning: resume=auto passes over {path}: {problem}; trying the previous complete checkpoint")
        if complete:
            raise CheckpointFileError(f"resume=auto: none of the {len(complete)} complete checkpoints in "
                                      f"{run_dir.checkpoints_dir} is whole (see the warnings above)")
        return None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint directory (no {COMPLETE} marker)")
    problem = damaged_file(path)
    if problem:
        raise CheckpointFileError(f"resume={resume}: {problem}")
    return path


def expected_size(run_dir: RunDir, engine) -> int:
    """Bytes the next checkpoint will take: the newest one's size, or before the first, the states
    DeepSpeed writes (the module in its dtype, and for each trained parameter fp32 master weights and
    two Adam moments)."""
    newest = run_dir.newest_checkpoint()
    if newest is not None:
        return sum(f.stat().st_size for f in newest.iterdir() if f.is_file())
    module_bytes = sum(p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
                       for p in engine.module.parameters())
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    return module_bytes + 12 * trained


def check_free_space(directory: Path, needed: int) -> None:
    """Collective: every rank sees enough free space under `directory` for `needed` bytes, or all raise."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    short = torch.tensor([free < needed], dtype=torch.int32, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        raise NoSpaceForCheckpoint(_no_space(directory, needed, free))


def _no_space(directory: Path, needed: int, free: int | None = None) -> str:
    have = f", {_size(free)} free" if free is not None else ""
    return (f"no space left on {directory}: needs ~{_size(needed)} for the next checkpoint{have}; the previous "
            "checkpoints are left as they were")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def save(engine, run_dir: RunDir, state: TrainState, metadata: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. `metadata` (world size, config, ...) goes to trainer_state.json."""
    path = run_dir.checkpoint(state.step)
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale partial write of the same step
    needed = expected_size(run_dir, engine)
    check_free_space(run_dir.checkpoints_dir, needed)
    dist.barrier()
    try:
        engine.save_checkpoint(str(run_dir.checkpoints_dir), tag=checkpoint_tag(state.step), save_latest=False)
        everything = state.state_dict()
        torch.save({k: everything[k] for k in PER_RANK}, rank_state_file(path, rank))
    except (OSError, RuntimeError) as e:  # torch.save says "unexpected pos" where the disk is full
        if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(run_dir.checkpoints_dir).free < 2**20:
            raise NoSpaceForCheckpoint(_no_space(run_dir.checkpoints_dir, needed)) from e
        raise
    fsync_tree(path)  # each rank its own writes (on a shared file system, another node's too: harmless)
    dist.barrier()
    if rank == 0:
        shared = {k: v for k, v in everything.items() if k not in PER_RANK}
        trainer_state_file(path).write_text(json.dumps({**shared, **metadata}, indent=2))
        fsync(trainer_state_file(path))
        (path / COMPLETE).touch()
        fsync(path)
        fsync(run_dir.checkpoints_dir)  # the step directory's own entry
        for old in run_dir.complete_checkpoints()[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return path


def load(engine, path: Path, state: TrainState, *, universal: bool, seed: int) -> dict:
    """Restore the engine and `state` from `path`; returns the checkpoint's trainer_state.json.
    `universal`: from `path/universal` (made by `universal.ensure_universal`), on another topology."""
    saved = json.loads(trainer_state_file(path).read_text())
    root, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    with weights_only_loads():  # DeepSpeed's own loads of its files too
        loaded, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    if universal:
        _repair_universal_load(engine, path / UNIVERSAL)
    rank = dist.get_rank()
    if saved["world_size"] == dist.get_world_size():
        state.load_state_dict({**saved, **load_file(rank_state_file(path, rank))})
    else:  # every rank saved the same global loader position; the RNG streams start afresh
        per_rank = load_file(rank_state_file(path, 0))
        state.load_state_dict({**saved, "loader": per_rank["loader"]})
        reseed_rng(seed, state.step, rank)
    return saved
