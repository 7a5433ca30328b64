"""Losses and exit statistics of a LoopLM forward: the one home of what training objectives, the
trainer's evaluation and `ouro-eval` compute from step states.

Labels are aligned with the inputs (-100 = not supervised) and position i predicts token i+1, as for
any Hugging Face causal LM; everything is computed on the supervised positions only, and the
vocabulary projection runs in chunks so no [tokens, vocab] logits tensor exists whole.

Loss per recurrent step (`evaluate_loss_per_step`): what the model predicts if it stops looping after
t steps, t = 1..T. One forward with T = max(ut_steps) gives every step's hidden state (step t does not
depend on later steps), so all t are scored from the same pass:

    loss(t)            CE of lm_head(h_t) on the supervised tokens (token-weighted mean), ppl = exp(loss)
    exit_mean_step(t)  E[step] under the exit pdf of a model run with T = t (steps counted from 1)
    exit_entropy(t)    entropy (nats) of that pdf

T may exceed the trained T (extrapolation, as in the paper's T = 5..8 rows).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ouro_train.model.modeling import exit_entropy, exit_pdf

IGNORE_INDEX = -100
_MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


def supervised_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, S-1] of positions whose next token is supervised, their targets [N])."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask]


def at_supervised(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] -> [N, ...] at the predicting positions of `mask` (see `supervised_targets`).
    `mask` covers the first S-1 positions, or all S for labels with one label of look-ahead (a
    sequence-parallel shard: `SequenceParallel.shard_labels`)."""
    return x[:, : mask.shape[1]][mask]


def chunked_cross_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token CE in fp32 of `lm_head(hidden)`: hidden [N, d], targets [N] -> [N], chunk by chunk,
    each chunk's logits recomputed in the backward pass instead of kept.

    Exception: a frozen head partitioned by ZeRO-3 (LoRA). DeepSpeed re-gathers a frozen parameter for
    a recompute only inside the backward of a module that owns it, and a chunk's first backward op is
    its cross-entropy, outside `lm_head`; such chunks keep their fp32 log-probabilities instead."""
    pieces = []
    weight = lm_head.weight
    frozen_zero3 = hasattr(weight, "ds_status") and not weight.requires_grad
    recompute = torch.is_grad_enabled() and not frozen_zero3
    for start in range(0, hidden.shape[0], chunk):
        args = (lm_head, hidden[start : start + chunk], targets[start : start + chunk])
        pieces.append(checkpoint(_chunk_ce, *args, use_reentrant=False) if recompute else _chunk_ce(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_ce(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def exit_statistic_sums(pdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the tokens of exit distributions [N, T]: (Σ expected exit step, 1-based; Σ exit entropy)."""
    step_numbers = torch.arange(1, pdf.shape[-1] + 1, device=pdf.device, dtype=pdf.dtype)
    return (pdf * step_numbers).sum(), exit_entropy(pdf).sum()


@torch.no_grad()
def evaluate_loss_per_step(
    model: nn.Module,
    batches: Iterable[dict],
    ut_steps: Sequence[int],
    *,
    chunk_tokens: int = 4096,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """Per-step loss, perplexity and exit statistics over `batches`.

    `model` is an `OuroForCausalLM` or a peft `PeftModel` around one. Each batch is a dict of [B, S]
    tensors as the data loader's `collate` makes them: `input_ids`, `labels` (unshifted, -100 where not
    supervised), optionally `attention_mask` and `position_ids` (packed rows); other keys are ignored.
    With data parallelism every rank passes its own share of the batches and an in-place sum
    `all_reduce` (e.g. `torch.distributed.all_reduce`; every rank must call). Under ZeRO-3 pass the
    engine's module, on every rank.

    Returns {"tokens": N, "per_step": [{"ut_steps", "loss", "ppl", "exit_mean_step", "exit_entropy"}, ...]}.
    """
    steps = sorted(set(ut_steps))
    if not steps or steps[0] < 1:
        raise ValueError(f"ut_steps must be positive step counts, got {list(ut_steps)}")
    lm_head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # rows: per step t, [loss sum, exit mean-step sum, exit entropy sum]; plus the token count
    sums = torch.zeros(len(steps), 3, dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: batch[k].to(device) for k in _MODEL_INPUTS if batch.get(k) is not None}
        mask, targets = supervised_targets(batch.pop("labels"))
        out = model(**batch, use_cache=False, total_ut_steps=steps[-1], compute_logits=False)
        tokens += targets.numel()
        for row, t in enumerate(steps):
            h = at_supervised(out.step_hidden_states[t - 1], mask)
            sums[row, 0] += chunked_cross_entropy(lm_head, h, targets, chunk_tokens).sum().double()
            mean_step, entropy = exit_statistic_sums(at_supervised(exit_pdf(out.gate_logits[..., :t]), mask).float())
            sums[row, 1] += mean_step.double()
            sums[row, 2] += entropy.double()
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(tokens)
    model.train(was_training)
    count = int(tokens.item())
    if count == 0:
        raise ValueError("no supervised tokens in the evaluation batches")
    means = (sums / count).tolist()
    return {
        "tokens": count,
        "per_step": [
            {"ut_steps": t, "loss": loss, "ppl": _perplexity(loss), "exit_mean_step": mean_step,
             "exit_entropy": entropy}
            for t, (loss, mean_step, entropy) in zip(steps, means)
        ],
    }


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
