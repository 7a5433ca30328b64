"""Activation checkpointing under every policy gives the gradients of no checkpointing (weights shared
across recurrent steps), recomputes exactly the forward FLOPs its name says, and composes with the
compiled layers."""

import shutil

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_instances_agree, tiny_model
from ouro_train.config import Checkpointing
from ouro_train.model import CHECKPOINT_GRANULARITIES
from ouro_train.model.checkpointing import parse_policy
from ouro_train.model.flops import hardware_flops_per_token, training_flops_per_token


def _grads(granularity: str, packed: bool, compile: bool = False):
    model = tiny_model(seed=3, total_ut_steps=3).train()
    model.set_activation_checkpointing(granularity)
    if compile:
        model.compile_layers()
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


@pytest.mark.parametrize("policy, forwards", [("none", 1), ("layer", 2), ("step", 2), ("step+layer", 3),
                                              ("layer/2", 2), ("layer/4", 1.5)])
def test_whole_region_policies_rerun_the_layer(policy, forwards):
    """`step` re-runs each step once; `step+layer` nests a layer checkpoint inside that recompute;
    `layer/k` checkpoints the applications step · L + layer that are multiples of k."""
    model = tiny_model(seed=1, num_hidden_layers=2, total_ut_steps=4).train()
    model.set_activation_checkpointing(policy)
    count = [0]
    model.model.layers[0].mlp.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    ids = torch.randint(3, 128, (1, 8))
    model(ids, labels=ids).loss.backward()
    assert count[0] == forwards * 4  # layer 0's applications are 0, 2, 4, 6: layer/4 checkpoints two


def _flops(policy: str, batch: int, seq: int) -> int:
    model = tiny_model(seed=3).train()
    model.set_activation_checkpointing(policy)
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, use_cache=False, compute_logits=False)
        sum(h.pow(2).mean() for h in out.step_hidden_states).backward()
    return counter.get_total_flops()


def test_each_policy_recomputes_exactly_its_forwards():
    """Counted FLOPs of forward + backward minus those without checkpointing are the matmul and the
    attention forwards of the T · L layer applications that the policy recomputes: a kept matmul or
    attention output is not recomputed, a step recompute re-runs everything once more."""
    batch, seq = 2, 32
    config = tiny_model().config
    d, heads, kv, head_dim, ffn = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                   config.head_dim, config.intermediate_size)
    applications = config.total_ut_steps * config.num_hidden_layers
    tokens = batch * seq
    matmul = 2 * tokens * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ffn)  # one application
    attention = 4 * tokens * seq * heads * head_dim  # QK^T and PV over the whole square, as torch counts them
    expected = {"none": (0, 0), "layer/4": (2, 2), "layer/2": (3, 3), "layer:save_matmul": (0, 0),
                "layer:save_attn": (6, 0), "layer": (6, 6), "step": (6, 6), "step+layer:save_matmul": (6, 6),
                "step+layer:save_attn": (12, 6), "step+layer": (12, 12)}  # recomputed (matmuls, attentions)
    assert expected.keys() == set(CHECKPOINT_GRANULARITIES) and applications == 6
    baseline = _flops("none", batch, seq)
    for policy, (matmuls, attentions) in expected.items():
        assert _flops(policy, batch, seq) - baseline == matmuls * matmul + attentions * attention, policy
        fractions = parse_policy(policy).recomputed_forwards(applications)
        assert fractions == pytest.approx((matmuls / applications, attentions / applications)), policy


def test_hardware_flops_add_the_recomputed_forwards():
    """model/flops.py: the recompute of each policy on top of the model FLOPs (attention causal)."""
    config = tiny_model().config
    seq, applications = 4096, config.total_ut_steps * config.num_hidden_layers
    model_flops = training_flops_per_token(config, seq)
    loss_head = 2 * config.vocab_size * config.hidden_size
    d, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim  # 4 query heads × 16 = d
    matmul = 2 * applications * (2 * d * d + 2 * d * kv_width + 3 * d * config.intermediate_size)
    attention = 2 * applications * seq * d
    assert hardware_flops_per_token(config, seq, "none") == model_flops + loss_head
    assert hardware_flops_per_token(config, seq, "layer:save_attn") == pytest.approx(model_flops + loss_head + matmul)
    assert hardware_flops_per_token(config, seq, "step+layer:save_matmul") == pytest.approx(
        model_flops + loss_head + matmul + attention)


def test_config_lists_every_policy():
    assert [m.value for m in Checkpointing] == [*CHECKPOINT_GRANULARITIES, "auto"]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch inductor needs a C++ compiler (g++ or cc) on the CPU")
def test_selective_policy_with_compiled_layers_equals_eager():
    """A selective layer checkpoint nested in step checkpoints, around compiled layers (inductor)."""
    torch._dynamo.reset()
    ref_loss, ref = _grads("none", packed=True)
    loss, got = _grads("step+layer:save_attn", packed=True, compile=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_hf_gradient_checkpointing_enable_maps_to_layer():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    assert model.model.activation_checkpointing == "layer" and model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert model.model.activation_checkpointing == "none" and not model.is_gradient_checkpointing


def test_unknown_granularity_rejected():
    with pytest.raises(ValueError, match="activation checkpointing"):
        tiny_model().set_activation_checkpointing("block")
