"""LoopLM training objectives.

Each objective returns the SUM of its per-token loss over the supervised tokens of a micro-batch; the
trainer divides by the number of supervised tokens of the whole optimizer step (all micro-batches, all
ranks), so the result does not depend on how a batch is split.

- `expected_logits`: upstream's `model(labels=...).loss`: cross-entropy of Σ_t p_t · logits_t.
- `expected_loss`:   the paper's Eq. 4: Σ_t p_t · CE_t − β · H(p).
- `final_step`:      cross-entropy of the last recurrent step only.
- `gate`:            stage-2 adaptive gate training (LM frozen): per token, the detached improvement of
                     step t over step t−1, I = max(0, CE_{t−1} − CE_t), gives a target continuation
                     probability w = σ(k · (I − γ)); the gate's exit probability λ is trained with
                     −[w · log(1 − λ) + (1 − w) · log λ], averaged over t = 2..T with the paper's 1/T.
                     λ is the gate after step t−1, the one that decides whether step t runs (the last
                     step's λ never enters the exit distribution, so it cannot be the one meant).

Every objective also reports, as sums over supervised tokens, the cross-entropy of each step
(`loss_step{t}`, 1-based), the mean exit step and the exit entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ouro_train.model import exit_pdf, mixture_logits

OBJECTIVES = ("expected_logits", "expected_loss", "final_step", "gate")
IGNORE = -100


@dataclass
class ObjectiveConfig:
    name: str = "expected_logits"
    entropy_beta: float = 0.05  # β of expected_loss (paper: 0.1 in stage 1a, 0.05 after)
    gate_k: float = 50.0  # slope k of the stage-2 target
    gate_gamma: float = 0.005  # improvement threshold γ of the stage-2 target


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable, summed over supervised tokens
    num_tokens: torch.Tensor  # supervised tokens of this micro-batch
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached sums over supervised tokens


def validate_objective(cfg: ObjectiveConfig) -> None:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name={cfg.name!r} is not one of {OBJECTIVES}")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE in fp32 per position: logits [B, S, V], labels [B, S] (unshifted, -100 = ignore)
    -> (ce [B, S-1] with 0 where ignored, mask [B, S-1])."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    ce = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(targets)
    return ce, mask


def compute_objective(cfg: ObjectiveConfig, out, labels: torch.Tensor, lm_head: nn.Module) -> ObjectiveOutput:
    """`out` is an `OuroCausalLMOutput` of a forward without labels (step states + gate logits)."""
    states = out.step_hidden_states
    pdf_model_dtype = out.exit_pdf
    pdf = exit_pdf(out.gate_logits.float())[:, :-1]  # [B, S-1, T] at the predicting positions
    mask = labels[:, 1:] != IGNORE
    num_tokens = mask.sum()

    # Per-step CE is always logged; it carries gradient only where the objective uses it.
    last = len(states) - 1
    grad_steps = {"expected_loss": set(range(last + 1)), "final_step": {last}}.get(cfg.name, set())
    step_ce = []
    for t, h in enumerate(states):
        with torch.set_grad_enabled(torch.is_grad_enabled() and t in grad_steps):
            ce, _ = token_cross_entropy(lm_head(h), labels)
        step_ce.append(ce)
    step_ce_t = torch.stack(step_ce, dim=-1)  # [B, S-1, T]

    if cfg.name == "expected_logits":
        ce, _ = token_cross_entropy(mixture_logits(lm_head, states, pdf_model_dtype), labels)
        per_token = ce
    elif cfg.name == "expected_loss":
        per_token = (pdf * step_ce_t).sum(-1) - cfg.entropy_beta * _entropy(pdf)
    elif cfg.name == "final_step":
        per_token = step_ce_t[..., -1]
    else:
        per_token = _gate_loss(out.gate_logits.float()[:, :-1], step_ce_t.detach(), cfg)

    steps = torch.arange(1, pdf.shape[-1] + 1, device=pdf.device, dtype=pdf.dtype)
    metric_sums = {f"loss_step{t + 1}": _masked_sum(step_ce_t[..., t].detach(), mask) for t in range(len(states))}
    metric_sums["exit_mean_step"] = _masked_sum((pdf.detach() * steps).sum(-1), mask)
    metric_sums["exit_entropy"] = _masked_sum(_entropy(pdf.detach()), mask)
    return ObjectiveOutput(loss_sum=_masked_sum(per_token, mask), num_tokens=num_tokens, metric_sums=metric_sums)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum()


def _entropy(pdf: torch.Tensor) -> torch.Tensor:
    return -(pdf * pdf.clamp_min(torch.finfo(pdf.dtype).tiny).log()).sum(-1)


def _gate_loss(gate_logits: torch.Tensor, step_ce: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """gate_logits [B, S-1, T] (fp32), step_ce [B, S-1, T] detached -> per-token loss [B, S-1]."""
    steps = step_ce.shape[-1]
    improvement = (step_ce[..., :-1] - step_ce[..., 1:]).clamp_min(0)  # step t over t-1, t = 2..T
    target_continue = torch.sigmoid(cfg.gate_k * (improvement - cfg.gate_gamma))
    deciding = gate_logits[..., :-1]  # λ after step t-1 decides whether step t runs
    # -[w·log(1-λ) + (1-w)·log λ] = BCE of the exit probability λ against the exit target 1-w.
    bce = F.binary_cross_entropy_with_logits(deciding, 1 - target_continue, reduction="none")
    return bce.sum(-1) / steps
