"""Reading a training run (layout: `ouro_train.run_dir`): its model directory and its DeepSpeed checkpoints.

Only checkpoints with a COMPLETE marker count. Weights are consolidated with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1/2/3, any number of ranks), or read from a universal
checkpoint's per-parameter fp32 files (`step-N/universal`, made when a run resumed on another topology);
parameters neither holds (frozen LoRA base weights under ZeRO-1, everything under stage 0) come from the
rank-0 module states file, which holds the whole module below ZeRO-3 (a universal checkpoint keeps it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from ouro_train.checkpoint_files import CheckpointFileError, damaged_file, weights_only_loads
from ouro_train.model import OuroConfig
from ouro_train.run_dir import (
    COMPLETE,
    RunDir,
    has_zero_shards,
    is_complete,
    is_universal,
    module_states_file,
    universal_param_file,
)


class ExportError(ValueError):
    """A run, checkpoint or request that cannot be exported; the message names the file at fault."""


@dataclass
class TrainingRun:
    root: Path
    config: OuroConfig
    lora_config: LoraConfig | None  # None for full fine-tuning
    base_model_path: str | None  # LoRA runs: where the base weights came from (None: random init)

    @classmethod
    def open(cls, run_dir: str | Path) -> "TrainingRun":
        layout = RunDir(run_dir)
        model_dir = layout.model_dir
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"{model_dir / 'config.json'} not found: {layout.root} is not a training output directory")
        config = OuroConfig.from_pretrained(model_dir)
        lora_config = base_path = None
        if layout.adapter_config_file.is_file():
            lora_config = LoraConfig.from_pretrained(model_dir)
            if not layout.base_model_file.is_file():
                raise ExportError(f"{layout.base_model_file} not found: a LoRA run records its base model there")
            base_path = json.loads(layout.base_model_file.read_text())["path"]
        return cls(layout.root, config, lora_config, base_path)

    @property
    def layout(self) -> RunDir:
        return RunDir(self.root)

    @property
    def model_dir(self) -> Path:
        return self.layout.model_dir

    def tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load the run's tokenizer from {self.model_dir}: {e}") from e

    def newest_checkpoint(self) -> Path:
        newest = self.layout.newest_checkpoint()
        if newest is None:
            raise ExportError(
                f"no complete checkpoint in {self.layout.checkpoints_dir} (a checkpoint counts once its "
                f"{COMPLETE} marker is written)"
            )
        return newest


def check_complete(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint {checkpoint_dir} does not exist")
    if not is_complete(checkpoint_dir):
        raise ExportError(f"checkpoint {checkpoint_dir} has no {COMPLETE} marker: its save did not finish")
    problem = damaged_file(checkpoint_dir)
    if problem:
        raise ExportError(f"checkpoint {checkpoint_dir}: {problem}")


def consolidated_state_dict(checkpoint_dir: Path, expected_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full state dict of the engine's module at `checkpoint_dir`, fp32 master weights where the
    optimizer holds them. `expected_keys` are the module's state-dict keys. Every file is read
    weights-only (DeepSpeed's consolidation included): one that holds more is refused, named."""
    try:
        with weights_only_loads():
            return _consolidated_state_dict(checkpoint_dir, expected_keys)
    except CheckpointFileError as e:
        raise ExportError(str(e)) from None


def _consolidated_state_dict(checkpoint_dir: Path, expected_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if is_universal(checkpoint_dir):
        files = {k: universal_param_file(checkpoint_dir, k) for k in expected_keys}
        state = {k: torch.load(f, map_location="cpu", weights_only=True)["param"] for k, f in files.items() if f.is_file()}
    elif has_zero_shards(checkpoint_dir):  # a ZeRO checkpoint (stage >= 1)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    missing = [k for k in expected_keys if k not in state]
    if missing:
        module_file = module_states_file(checkpoint_dir)
        module = {}
        if module_file.is_file():
            module = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
        absent = [k for k in missing if k not in module or module[k].numel() == 0]
        if absent:
            raise ExportError(
                f"checkpoint {checkpoint_dir} lacks {len(absent)} weights of the model, e.g. {absent[:3]}"
            )
        state.update({k: module[k] for k in missing})
    return state
