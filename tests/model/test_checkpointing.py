"""Activation checkpointing at every granularity gives the gradients of no checkpointing (weights shared
across recurrent steps)."""

import pytest
import torch

from conftest import assert_instances_agree, tiny_model
from ouro_train.model import CHECKPOINT_GRANULARITIES


def _grads(granularity: str, packed: bool):
    model = tiny_model(seed=3, total_ut_steps=3).train()
    model.set_activation_checkpointing(granularity)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    kwargs = {}
    if packed:  # two documents per row
        kwargs["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1)
    out = model(ids, labels=labels, **kwargs)
    # Use the step states and the exit pdf too, as the training objectives do.
    (out.loss + out.exit_pdf[..., -1].mean() + out.step_hidden_states[0].pow(2).mean()).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("granularity", [g for g in CHECKPOINT_GRANULARITIES if g != "none"])
def test_gradients_equal_without_checkpointing(granularity, packed):
    ref_loss, ref = _grads("none", packed)
    loss, got = _grads(granularity, packed)
    assert_instances_agree(loss, ref_loss)  # each call builds its own model instance
    assert ref.keys() == got.keys()
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-12)
        rel = ((got[name] - ref[name]).abs().max() / scale).item()
        assert rel <= 1e-6, f"{granularity}: {name} differs (relative {rel:.2e})"
    # Shared weights receive gradient from every step: the layer-0 query projection is non-zero.
    assert got["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_checkpointing_counts_recomputations():
    """`step` recomputes each step once; `step+layer` nests a per-layer checkpoint inside that recompute."""
    calls = {}

    def run(granularity):
        model = tiny_model(seed=1).train()
        model.set_activation_checkpointing(granularity)
        count = [0]
        model.model.layers[0].mlp.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        ids = torch.randint(3, 128, (1, 8))
        model(ids, labels=ids).loss.backward()
        calls[granularity] = count[0]

    for g in CHECKPOINT_GRANULARITIES:
        run(g)
    steps = 3
    assert calls == {"none": steps, "layer": 2 * steps, "step": 2 * steps, "step+layer": 3 * steps}


def test_hf_gradient_checkpointing_enable_maps_to_layer():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    assert model.model.activation_checkpointing == "layer" and model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert model.model.activation_checkpointing == "none" and not model.is_gradient_checkpointing


def test_unknown_granularity_rejected():
    with pytest.raises(ValueError, match="activation checkpointing"):
        tiny_model().set_activation_checkpointing("block")
