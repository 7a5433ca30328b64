"""Run metrics: `output_dir/metrics.jsonl` (one object per optimizer step or eval, appended across
resumes: a step done twice appears twice and the later record wins), a progress bar, and wandb, all on
rank 0 only."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "ouro-train"
    name: Optional[str] = None  # run name; default: the output directory's name
    entity: Optional[str] = None


def validate_wandb(cfg: WandbConfig) -> None:
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode must be one of {WANDB_MODES}, got {cfg.mode!r}")


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int,
                 wandb_cfg: WandbConfig, run_config: dict):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._run = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_cfg.mode != "disabled":
            import wandb

            self._run = wandb.init(
                mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                name=wandb_cfg.name or Path(output_dir).resolve().name, dir=str(output_dir), config=run_config,
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._run is not None:
            prefix = "eval/" if record.get("split") == "eval" else "train/"
            self._run.log({prefix + k: v for k, v in record.items() if k not in ("split", "time", "step")},
                          step=record["step"])
        if record.get("split") != "eval" and self._bar is not None:
            self._bar.n = record["step"]
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tok_per_s']:,.0f}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._run is not None:
            self._run.finish()
