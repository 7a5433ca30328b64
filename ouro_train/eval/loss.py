"""Loss per recurrent step: what the model predicts if it stops looping after t steps, t = 1..T.

One forward with T = max(ut_steps) gives every step's hidden state (step t does not depend on later
steps), so all t are scored from the same pass:

    loss(t)            CE of lm_head(h_t) on the supervised tokens (token-weighted mean), ppl = exp(loss)
    exit_mean_step(t)  E[step] under the exit pdf of a model run with T = t (steps counted from 1)
    exit_entropy(t)    entropy (nats) of that pdf

both averaged over the positions whose next token is supervised. T may exceed the trained T
(extrapolation, as in the paper's T = 5..8 rows).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ouro_train.data.loader import IGNORE_INDEX
from ouro_train.model import exit_entropy, exit_pdf
from ouro_train.train.objectives import chunked_cross_entropy

_MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


@torch.no_grad()
def evaluate_loss_per_step(
    model: nn.Module,
    batches: Iterable[dict],
    ut_steps: Sequence[int],
    sum_across_ranks: bool = False,
    chunk_tokens: int = 4096,
) -> dict:
    """Per-step loss, perplexity and exit statistics over `batches`.

    `model` is an `OuroForCausalLM` or a peft `PeftModel` around one. Each batch is a dict of [B, S]
    tensors as the data loader's `collate` makes them: `input_ids`, `labels` (the token, or -100 where
    not supervised; unshifted, as for the model's `labels`), optionally `attention_mask` and
    `position_ids` (packed rows); other keys are ignored. The vocabulary projection runs `chunk_tokens`
    tokens at a time. With `sum_across_ranks` every rank passes its
    own share of the batches and the sums are all-reduced (every rank must call). Under ZeRO-3 pass
    the engine's module, on every rank.

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
        labels = batch.pop("labels")
        out = model(**batch, use_cache=False, total_ut_steps=steps[-1], compute_logits=False)
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX  # positions whose next token is supervised
        targets = targets[scored]
        tokens += targets.numel()
        for row, t in enumerate(steps):
            h = out.step_hidden_states[t - 1][:, :-1][scored]
            sums[row, 0] += chunked_cross_entropy(lm_head, h, targets, chunk_tokens).sum().double()
            pdf = exit_pdf(out.gate_logits[..., :t])[:, :-1][scored].float()
            sums[row, 1] += (pdf * torch.arange(1, t + 1, device=device)).sum().double()
            sums[row, 2] += exit_entropy(pdf).sum().double()
    if sum_across_ranks:
        dist.all_reduce(sums)
        dist.all_reduce(tokens)
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
