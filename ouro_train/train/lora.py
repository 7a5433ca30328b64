"""LoRA through peft: adapters on the linear projections, optional extra trainable modules, and the
variants domain adaptation reaches for first (DoRA, rsLoRA, PiSSA/OLoRA/Gaussian initialisation, LoRA+).

peft does the adapting; LoRA+ (a higher learning rate for the B matrices) is a split of the parameters
into DeepSpeed parameter groups (`engine.loraplus_param_groups`), since DeepSpeed builds the optimizer.
"""

from __future__ import annotations

from torch import nn

from ouro_train.config import ALL_LINEAR, LoraConfig, LoraInit

NOT_ADAPTED = ["early_exit_gate"]  # a linear layer that "all-linear" would take; its output is one logit
# peft's `init_lora_weights` for each choice
PEFT_INIT = {LoraInit.default: True, LoraInit.gaussian: "gaussian", LoraInit.pissa: "pissa", LoraInit.olora: "olora"}


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, TaskType

    targets = ALL_LINEAR if cfg.target_modules == ALL_LINEAR else list(cfg.target_modules)
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=targets, exclude_modules=list(NOT_ADAPTED),
        modules_to_save=list(cfg.modules_to_save) or None, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
        init_lora_weights=PEFT_INIT[cfg.init],
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
