"""LoRA through peft: adapters on the linear projections, optional extra trainable modules, and the
variants domain adaptation reaches for first (DoRA, rsLoRA, PiSSA/OLoRA/Gaussian initialisation, LoRA+).

peft does the adapting; LoRA+ (a higher learning rate for the B matrices) is a split of the parameters
into DeepSpeed parameter groups, since DeepSpeed builds the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from torch import nn

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# peft's "all-linear" takes every linear layer but the output head: the exit gate is one too.
PEFT_ALL_LINEAR = "all-linear"
NOT_ADAPTED = ["early_exit_gate"]


class LoraInit(Enum):
    default = "default"  # A Kaiming-uniform, B zero: training starts from the base model
    gaussian = "gaussian"  # A Gaussian (scaled by 1/r), B zero
    pissa = "pissa"  # A, B from the top-r singular vectors of W; the base keeps the rest (W - BA)
    olora = "olora"  # A, B from a QR decomposition of W; the base keeps the rest


# peft's `init_lora_weights` for each choice
PEFT_INIT = {LoraInit.default: True, LoraInit.gaussian: "gaussian", LoraInit.pissa: "pissa", LoraInit.olora: "olora"}
# These move part of W into the adapter: the frozen base weights differ from the base model's.
BASE_CHANGING_INITS = (LoraInit.pissa, LoraInit.olora)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # A list of Ouro projections, or the string "all-linear" (all seven).
    target_modules: Any = field(default_factory=lambda: list(ALL_LINEAR))
    # Whole modules trained (and saved) beside the adapters, e.g. ["early_exit_gate"] or norms
    # ["input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2", "norm"].
    modules_to_save: List[str] = field(default_factory=list)
    use_dora: bool = False  # DoRA: a learnt magnitude per output feature, LoRA on the direction
    use_rslora: bool = False  # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r
    init: LoraInit = LoraInit.default
    # LoRA+: the B matrices (and trained vectors, as peft's LoRA+ does) learn at optim.lr × this ratio.
    loraplus_lr_ratio: Optional[float] = None


def peft_config(cfg: LoraConfig):
    """peft's LoraConfig for `cfg`; a value peft would not take fails here, naming the field."""
    from peft import LoraConfig as PeftLoraConfig, TaskType

    if cfg.r < 1:
        raise ValueError(f"lora.r must be >= 1, got {cfg.r}")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise ValueError(f"lora.loraplus_lr_ratio must be > 0, got {cfg.loraplus_lr_ratio}")
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=_target_modules(cfg.target_modules), exclude_modules=list(NOT_ADAPTED),
        modules_to_save=list(cfg.modules_to_save) or None, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
        init_lora_weights=PEFT_INIT[cfg.init],
    )


def _target_modules(targets) -> str | list[str]:
    if targets == PEFT_ALL_LINEAR:
        return PEFT_ALL_LINEAR
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"lora.target_modules must be {PEFT_ALL_LINEAR!r} or a list of {ALL_LINEAR}, got {targets!r}")
    unknown = set(targets) - set(ALL_LINEAR)
    if unknown:
        raise ValueError(f"lora.target_modules {sorted(unknown)} are not Ouro projections; choose from {ALL_LINEAR}")
    return list(targets)


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
