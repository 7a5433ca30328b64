"""LoRA through peft: adapters on the linear projections, optional extra trainable modules."""

from __future__ import annotations

from torch import nn

from ouro_train.config import LoraConfig


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, TaskType

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
