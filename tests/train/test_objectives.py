"""Each LoopLM objective equals a direct, loop-by-loop computation from the model's outputs."""

import math

import pytest
import torch

from conftest import tiny_model
from ouro_train.config import Objective, ObjectiveConfig
from ouro_train.train.objectives import compute_objective


@pytest.fixture(scope="module")
def batch():
    model = tiny_model(seed=31)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        out = model(ids, use_cache=False, compute_logits=False)
        step_logits = [model(ids, exit_at_step=t, use_cache=False).logits for t in range(3)]
    return model, ids, labels, out, step_logits


def _targets(labels):
    """(batch, position, target) for every supervised next-token prediction."""
    return [(b, i, int(labels[b, i + 1])) for b in range(labels.shape[0]) for i in range(labels.shape[1] - 1)
            if labels[b, i + 1] != -100]


def _ce(logits_row, target):
    return -(logits_row.double().log_softmax(-1)[target]).item()


def test_expected_logits_equals_the_models_labels_loss(batch):
    model, ids, labels, out, _ = batch
    obj = compute_objective(ObjectiveConfig(Objective.expected_logits), out, labels, model.lm_head)
    with torch.no_grad():
        reference = model(ids, labels=labels, use_cache=False).loss
    assert obj.num_tokens == len(_targets(labels))
    assert math.isclose(obj.loss_sum.item() / obj.num_tokens.item(), reference.item(), rel_tol=1e-6)


def test_expected_loss_is_expected_ce_minus_entropy(batch):
    model, _, labels, out, step_logits = batch
    beta = 0.05
    obj = compute_objective(ObjectiveConfig(Objective.expected_loss, entropy_beta=beta), out, labels, model.lm_head)
    total = 0.0
    for b, i, target in _targets(labels):
        p = out.exit_pdf[b, i].double()
        expected_ce = sum(p[t].item() * _ce(step_logits[t][b, i], target) for t in range(3))
        entropy = -sum(p[t].item() * math.log(p[t].item()) for t in range(3))
        total += expected_ce - beta * entropy
    assert math.isclose(obj.loss_sum.item(), total, rel_tol=1e-5)


def test_final_step_is_last_step_ce(batch):
    model, _, labels, out, step_logits = batch
    obj = compute_objective(ObjectiveConfig(Objective.final_step), out, labels, model.lm_head)
    total = sum(_ce(step_logits[2][b, i], t) for b, i, t in _targets(labels))
    assert math.isclose(obj.loss_sum.item(), total, rel_tol=1e-5)


def test_gate_objective_follows_the_stage_two_formula(batch):
    model, _, labels, out, step_logits = batch
    k, gamma, steps = 50.0, 0.005, 3
    obj = compute_objective(ObjectiveConfig(Objective.gate, gate_k=k, gate_gamma=gamma), out, labels, model.lm_head)
    total = 0.0
    for b, i, target in _targets(labels):
        ce = [_ce(step_logits[t][b, i], target) for t in range(steps)]
        token = 0.0
        for t in range(1, steps):  # steps 2..T (1-based)
            improvement = max(0.0, ce[t - 1] - ce[t])
            w = 1 / (1 + math.exp(-k * (improvement - gamma)))
            lam = 1 / (1 + math.exp(-out.gate_logits[b, i, t - 1].item()))  # gate deciding whether step t runs
            token += -(w * math.log(1 - lam) + (1 - w) * math.log(lam))
        total += token / steps
    assert math.isclose(obj.loss_sum.item(), total, rel_tol=1e-5)


def test_metrics_are_per_step_ce_and_exit_statistics(batch):
    model, _, labels, out, step_logits = batch
    obj = compute_objective(ObjectiveConfig(Objective.expected_logits), out, labels, model.lm_head)
    targets = _targets(labels)
    for t in range(3):
        direct = sum(_ce(step_logits[t][b, i], target) for b, i, target in targets)
        assert math.isclose(obj.metric_sums[f"loss_step{t + 1}"].item(), direct, rel_tol=1e-5)
    mean_step = sum(sum((t + 1) * out.exit_pdf[b, i, t].item() for t in range(3)) for b, i, _ in targets)
    assert math.isclose(obj.metric_sums["exit_mean_step"].item(), mean_step, rel_tol=1e-5)


def test_gradients_reach_what_each_objective_trains():
    model = tiny_model(seed=32).train()
    ids = torch.randint(3, 128, (1, 10))
    for name in ("expected_logits", "expected_loss", "final_step", "gate"):
        model.zero_grad(set_to_none=True)
        out = model(ids, use_cache=False, compute_logits=False)
        compute_objective(ObjectiveConfig(Objective[name]), out, ids, model.lm_head).loss_sum.backward()
        gate_grad = model.model.early_exit_gate.weight.grad
        head_grad = model.lm_head.weight.grad
        if name == "final_step":
            assert gate_grad is None or gate_grad.abs().sum() == 0  # the last step ignores the gate
        else:
            assert gate_grad.abs().sum() > 0
        if name == "gate":
            assert head_grad is None  # the LM receives nothing from the gate objective
        else:
            assert head_grad.abs().sum() > 0


def test_chunked_loss_never_keeps_whole_logits_for_backward():
    """The largest tensor kept for the backward pass is far below one [tokens, vocab] logits tensor,
    which a plain `cross_entropy(lm_head(h))` keeps."""
    model = tiny_model(seed=33).train()
    ids = torch.randint(3, 128, (2, 64))
    vocab, tokens = model.config.vocab_size, 2 * 63

    def largest_saved(loss_fn) -> tuple[int, float]:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        out = model(ids, use_cache=False, compute_logits=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(out)
        return max(sizes), loss.item()

    config = ObjectiveConfig(Objective.final_step, loss_chunk_tokens=16)
    chunked, loss = largest_saved(lambda out: compute_objective(config, out, ids, model.lm_head).loss_sum)
    plain, reference = largest_saved(lambda out: torch.nn.functional.cross_entropy(
        model.lm_head(out.step_hidden_states[-1][:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
    assert chunked < tokens * vocab / 4 and plain >= tokens * vocab
    assert math.isclose(loss, reference, rel_tol=1e-6)


def test_no_supervised_token_gives_a_zero_loss_that_backpropagates():
    model = tiny_model(seed=34).train()
    ids = torch.randint(3, 128, (1, 8))
    out = model(ids, use_cache=False, compute_logits=False)
    obj = compute_objective(ObjectiveConfig(), out, torch.full_like(ids, -100), model.lm_head)
    assert obj.num_tokens == 0 and obj.loss_sum.item() == 0.0
    obj.loss_sum.backward()


@pytest.mark.parametrize("name, own_steps", [(Objective.expected_logits, []), (Objective.expected_loss, [1, 2, 3]),
                                             (Objective.final_step, [3]), (Objective.gate, [1, 2, 3])])
def test_without_step_losses_only_the_objectives_own_are_reported(batch, name, own_steps):
    """A step that does not log its per-step losses computes the same loss and reports the steps' losses
    the objective computes for itself (no extra head projection), with the same values."""
    model, _, labels, out, _ = batch
    full = compute_objective(ObjectiveConfig(name), out, labels, model.lm_head)
    lean = compute_objective(ObjectiveConfig(name), out, labels, model.lm_head, step_losses=False)
    assert torch.equal(lean.loss_sum, full.loss_sum)
    assert sorted(k for k in lean.metric_sums if k.startswith("loss_step")) == [f"loss_step{t}" for t in own_steps]
    for key, value in lean.metric_sums.items():
        assert torch.equal(value, full.metric_sums[key])
