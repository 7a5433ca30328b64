"""LoRA through peft: adapters on the linear projections, optional extra trainable modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from torch import nn

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(ALL_LINEAR))
    # Whole modules trained (and saved) beside the adapters, e.g. ["early_exit_gate"] or norms
    # ["input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2", "norm"].
    modules_to_save: List[str] = field(default_factory=list)


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, TaskType

    unknown = set(cfg.target_modules) - set(ALL_LINEAR)
    if unknown:
        raise ValueError(f"lora.target_modules {sorted(unknown)} are not Ouro projections; choose from {ALL_LINEAR}")
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None,
    )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
