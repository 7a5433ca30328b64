"""Reading a training run: its model directory and its DeepSpeed checkpoints.

Layout written by the trainer:

    OUTPUT_DIR/model/                    config.json (OuroConfig) + tokenizer files;
                                         LoRA runs also adapter_config.json and base_model.json
                                         ({"path": base model directory, or null for a random init})
    OUTPUT_DIR/checkpoints/step-{N:08d}/ engine.save_checkpoint(..., tag="step-{N:08d}"), trainer_state.json,
                                         and an empty COMPLETE marker written last

Only checkpoints with COMPLETE count. Weights are consolidated with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1/2/3, any number of ranks); parameters it does not
return (frozen LoRA base weights under ZeRO-1, everything under stage 0) come from the rank-0 module
states file, which holds the whole module below ZeRO-3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from ouro_train.model import OuroConfig
from ouro_train.train.checkpoint import (
    ADAPTER_CONFIG_FILE,
    BASE_MODEL_FILE,
    COMPLETE,
    MODEL_DIR,
    checkpoints_root,
    complete_checkpoints,
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
        root = Path(run_dir)
        model_dir = root / MODEL_DIR
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"{model_dir / 'config.json'} not found: {root} is not a training output directory")
        config = OuroConfig.from_pretrained(model_dir)
        lora_config = base_path = None
        if (model_dir / ADAPTER_CONFIG_FILE).is_file():
            lora_config = LoraConfig.from_pretrained(model_dir)
            base_file = model_dir / BASE_MODEL_FILE
            if not base_file.is_file():
                raise ExportError(f"{base_file} not found: a LoRA run records its base model there")
            base_path = json.loads(base_file.read_text())["path"]
        return cls(root, config, lora_config, base_path)

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    def tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load the run's tokenizer from {self.model_dir}: {e}") from e

    def newest_checkpoint(self) -> Path:
        complete = complete_checkpoints(self.root)
        if not complete:
            raise ExportError(
                f"no complete checkpoint in {checkpoints_root(self.root)} (a checkpoint counts once its "
                f"{COMPLETE} marker is written)"
            )
        return complete[-1]


def check_complete(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint {checkpoint_dir} does not exist")
    if not (checkpoint_dir / COMPLETE).is_file():
        raise ExportError(f"checkpoint {checkpoint_dir} has no {COMPLETE} marker: its save did not finish")


def consolidated_state_dict(checkpoint_dir: Path, expected_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full state dict of the engine's module at `checkpoint_dir`, fp32 master weights where the
    optimizer holds them. `expected_keys` are the module's state-dict keys."""
    state: dict[str, torch.Tensor] = {}
    if any(checkpoint_dir.glob("*_optim_states.pt")):  # a ZeRO checkpoint (stage >= 1)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    missing = [k for k in expected_keys if k not in state]
    if missing:
        module_file = checkpoint_dir / "mp_rank_00_model_states.pt"
        module = {}
        if module_file.is_file():
            module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        absent = [k for k in missing if k not in module or module[k].numel() == 0]
        if absent:
            raise ExportError(
                f"checkpoint {checkpoint_dir} lacks {len(absent)} weights of the model, e.g. {absent[:3]}"
            )
        state.update({k: module[k] for k in missing})
    return state
