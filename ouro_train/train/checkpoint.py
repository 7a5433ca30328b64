"""The layout of a training run, and its checkpoints `output_dir/checkpoints/step-NNNNNNNN/`.

    output_dir/model/        the model's config.json and the tokenizer files; LoRA runs also the peft
                             adapter_config.json and base_model.json ({"path": base dir, or null});
                             data_manifest.json, the prepared training data's counts per source
    output_dir/checkpoints/  the checkpoints below
    output_dir/metrics.jsonl the metrics

Each holds DeepSpeed's checkpoint (module, optimizer and scheduler states, ZeRO shards), one
`rank{r}.pt` per process (data-loader position and RNG states) and `trainer_state.json`. The empty
`COMPLETE` marker is written last, after every rank has finished: a directory without it (a crash or a
kill mid-write) is never a resume point, and is deleted when that step is saved again.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
MODEL_DIR = "model"
BASE_MODEL_FILE = "base_model.json"
DATA_MANIFEST_FILE = "data_manifest.json"  # the training split's manifest, for the export's model card
ADAPTER_CONFIG_FILE = "adapter_config.json"  # written by peft's LoraConfig.save_pretrained
_TAG = re.compile(r"^step-(\d{8})$")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint of output_dir, if any; `none`; or an explicit directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint directory (no {COMPLETE} marker)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir: str | Path, step: int, rank_state: dict, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it."""
    root = checkpoints_root(output_dir)
    path = root / tag(step)
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale partial write of the same step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag(step), save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, path / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (path / COMPLETE).touch()
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return path


def load(engine, path: Path) -> tuple[dict, dict]:
    """Restore engine + this rank's state; returns (rank_state, trainer_state)."""
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    if trainer_state["world_size"] != dist.get_world_size():
        raise RuntimeError(
            f"{path} was written by {trainer_state['world_size']} processes; this run has "
            f"{dist.get_world_size()}: resume with the same number of processes"
        )
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rank_state = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return rank_state, trainer_state
