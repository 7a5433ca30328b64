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
(`loss_step{t}`, 1-based), the mean exit step and the exit entropy. A step's cross-entropy that the
objective does not use itself costs a vocabulary projection of every token (2 · vocab · d FLOPs per
token and step): with `step_losses=False` only those the objective computes anyway are reported (the
trainer asks for all of them every `train.log_every` steps).

Memory: everything is computed on the supervised positions only, and the vocabulary projection runs in
chunks of `loss_chunk_tokens` tokens, each recomputed in the backward pass, so no [tokens, vocab]
logits tensor ever exists whole. `expected_logits` uses that `lm_head` has no bias:
Σ_t p_t · (W h_t) = W · (Σ_t p_t h_t), one head projection instead of T (equal up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ouro_train.config import Objective, ObjectiveConfig
from ouro_train.model import exit_entropy, exit_pdf
from ouro_train.model.loss import at_supervised, chunked_cross_entropy, exit_statistic_sums, supervised_targets


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable, summed over supervised tokens
    num_tokens: torch.Tensor  # supervised tokens of this micro-batch
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached sums over supervised tokens


def compute_objective(cfg: ObjectiveConfig, out, labels: torch.Tensor, lm_head: nn.Module,
                      step_losses: bool = True) -> ObjectiveOutput:
    """`out` is an `OuroCausalLMOutput` of a forward without labels (step states + gate logits);
    `labels` are aligned with the inputs (-100 = not supervised); position i predicts token i+1.
    `step_losses=False`: report only the per-step losses the objective computes for itself."""
    mask, targets = supervised_targets(labels)  # targets [N]
    states = [at_supervised(h, mask) for h in out.step_hidden_states]  # T × [N, d]
    gate_logits = at_supervised(out.gate_logits, mask).float()  # [N, T]
    pdf = exit_pdf(gate_logits)  # fp32 for the loss terms and statistics
    steps = len(states)

    # Per-step CE carries gradient only where the objective uses it; the gate's target needs every step's.
    grad_steps = {Objective.expected_loss: set(range(steps)), Objective.final_step: {steps - 1}}.get(cfg.name, set())
    needed = set(range(steps)) if step_losses or cfg.name == Objective.gate else grad_steps
    step_ce = {}
    for t in sorted(needed):
        with torch.set_grad_enabled(torch.is_grad_enabled() and t in grad_steps):
            step_ce[t] = chunked_cross_entropy(lm_head, states[t], targets, cfg.loss_chunk_tokens)

    if cfg.name == Objective.expected_logits:
        # The mixture is formed in the activation dtype with the model-dtype pdf, as upstream forms its logits.
        pdf_model = at_supervised(out.exit_pdf, mask)
        mixture = states[0] * pdf_model[:, :1]
        for t in range(1, steps):
            mixture = mixture + states[t] * pdf_model[:, t : t + 1]
        per_token = chunked_cross_entropy(lm_head, mixture, targets, cfg.loss_chunk_tokens)
    elif cfg.name == Objective.expected_loss:
        per_token = (pdf * torch.stack([step_ce[t] for t in range(steps)], dim=-1)).sum(-1) \
            - cfg.entropy_beta * exit_entropy(pdf)
    elif cfg.name == Objective.final_step:
        per_token = step_ce[steps - 1]
    else:
        per_token = _gate_loss(gate_logits, torch.stack([step_ce[t] for t in range(steps)], dim=-1).detach(), cfg)

    metric_sums = {f"loss_step{t + 1}": ce.detach().sum() for t, ce in step_ce.items()}
    metric_sums["exit_mean_step"], metric_sums["exit_entropy"] = exit_statistic_sums(pdf.detach())
    loss_sum = per_token.sum()
    if targets.numel() == 0:  # nothing supervised here: a zero that still reaches the graph for backward
        loss_sum = out.gate_logits.sum() * 0.0
    return ObjectiveOutput(loss_sum=loss_sum, num_tokens=mask.sum(), metric_sums=metric_sums)


def _gate_loss(gate_logits: torch.Tensor, step_ce: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """gate_logits [N, T] (fp32), step_ce [N, T] detached -> per-token loss [N]."""
    steps = step_ce.shape[-1]
    improvement = (step_ce[:, :-1] - step_ce[:, 1:]).clamp_min(0)  # step t over t-1, t = 2..T
    target_continue = torch.sigmoid(cfg.gate_k * (improvement - cfg.gate_gamma))
    deciding = gate_logits[:, :-1]  # λ after step t-1 decides whether step t runs
    # -[w·log(1-λ) + (1-w)·log λ] = BCE of the exit probability λ against the exit target 1-w.
    bce = F.binary_cross_entropy_with_logits(deciding, 1 - target_continue, reduction="none")
    return bce.sum(-1) / steps
