"""Run metrics: `output_dir/metrics.jsonl` (one object per optimizer step or eval, appended across
resumes: a step done twice appears twice and the later record wins), a progress bar, and wandb, all on
rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ouro_train.config import WandbConfig, WandbMode


class MetricsLogger:
    def __init__(self, path: Path, *, enabled: bool, total_steps: int, start_step: int,
                 wandb_cfg: WandbConfig, run_config: dict):
        """`path`: the run's metrics file; wandb writes beside it."""
        self.enabled = enabled
        self.path = path
        output_dir = path.parent
        self._run = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_cfg.mode != WandbMode.disabled:
            import wandb

            self._run = wandb.init(
                mode=wandb_cfg.mode.value, project=wandb_cfg.project, entity=wandb_cfg.entity,
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
