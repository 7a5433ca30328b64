"""What trains: the architecture a run builds, how a built model is made trainable, and the forward +
objective of one micro-batch.

The trainer, the dry run's memory/FLOPs plan (`train/memory.py`, `train/plan.py`) and the benchmarks
all call these, so the step the plan traces on fake tensors is the step the trainer runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ouro_train.config import LoraConfig, ModelInit, Objective, ObjectiveConfig, RunConfig
from ouro_train.model import OuroConfig
from ouro_train.model.configuration import RELEASED_ARCHITECTURES
from ouro_train.train.lora import apply_lora
from ouro_train.train.objectives import ObjectiveOutput, compute_objective


def architecture(run: RunConfig, planning: bool = False) -> OuroConfig:
    """The architecture a run trains: model.path's config.json when it has one, else the class defaults
    (`model.init=random`); `model.config_overrides` on top. `planning` (the dry run, no checkpoint
    needed): `plan.model_size` wins when set, and a pretrained run whose checkpoint is not at hand is
    planned as Ouro-1.4B."""
    m = run.model
    overrides = dict(m.config_overrides)
    if planning and run.plan.model_size is not None:
        config = OuroConfig(**{**RELEASED_ARCHITECTURES[run.plan.model_size.value], **overrides})
    elif m.path and (not planning or Path(m.path, "config.json").exists()):
        config = OuroConfig.from_pretrained(m.path, **overrides)
    elif m.init == ModelInit.random or not planning:
        config = OuroConfig(**overrides)
    else:
        config = OuroConfig(**{**RELEASED_ARCHITECTURES["1.4b"], **overrides})
    config._attn_implementation = m.attn_implementation.value
    return config


def make_trainable(model: nn.Module, checkpointing: str, lora: LoraConfig, objective: ObjectiveConfig,
                   compile: bool = False) -> nn.Module:
    """The built model as it trains: no KV cache, `checkpointing` (a resolved policy, not `auto`),
    regional compilation, LoRA adapters, and for the gate objective only the exit gate trainable.
    Returns the model to train (a peft wrapper with LoRA)."""
    model.config.use_cache = False
    model.set_activation_checkpointing(checkpointing)
    if compile:
        model.compile_layers()
    if lora.enabled:
        model = apply_lora(model, lora)
    if objective.name == Objective.gate:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("model.early_exit_gate."))
    return model


def micro_batch_objective(model: nn.Module, lm_head: nn.Module, batch: dict, objective: ObjectiveConfig,
                          device: torch.device, sequence_parallel=None, step_losses: bool = True) -> ObjectiveOutput:
    """Forward of one micro-batch (`input_ids`, `labels`, optional `position_ids` / `attention_mask`,
    whole rows) and its objective. `model` is what is called (the DeepSpeed engine, or the module);
    `lm_head` the head the objective projects with. Under `sequence_parallel` this rank's targets only.
    `step_losses=False`: the per-step losses the objective does not need itself are not computed."""
    kwargs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask")
              if batch.get(k) is not None}
    labels = batch["labels"]
    if sequence_parallel is not None:  # whole rows in; this rank's tokens' states out, and their labels
        kwargs["sequence_parallel"] = sequence_parallel
        labels = sequence_parallel.shard_labels(labels)
    out = model(**kwargs, use_cache=False, compute_logits=False)
    return compute_objective(objective, out, labels.to(device), lm_head, step_losses=step_losses)
