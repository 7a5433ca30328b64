"""MFU's denominator: the dense bf16 peak by device name (an unknown device gets none); hardware FLOPs
per token, recomputation included, against torch's FLOP counter over a real forward + backward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config
from ouro_train.model import OuroForCausalLM
from ouro_train.model.flops import (
    hardware_flops_per_token,
    hardware_flops_utilization,
    model_flops_utilization,
    peak_bf16_flops,
    training_flops_per_token,
)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_hfu_is_tokens_times_executed_flops_over_peak():
    assert hardware_flops_utilization(1000.0, 3e10, "NVIDIA H100 80GB HBM3") == pytest.approx(1000.0 * 3e10 / 989e12)
    assert hardware_flops_utilization(1000.0, 3e10, "Unknown GPU") is None


def test_mfu_is_tokens_times_flops_over_peak():
    config = tiny_config()
    flops = training_flops_per_token(config, 512)
    assert model_flops_utilization(1000.0, config, 512, "NVIDIA H200") == pytest.approx(1000.0 * flops / 989e12)
    assert model_flops_utilization(1000.0, config, 512, "Unknown GPU") is None


# Short rows: attention, which the counter counts without the causal half, stays ~1% of the FLOPs.
SEQ = 16
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=32, total_ut_steps=3)


def counted_layer_stack_flops_per_token(checkpointing: str) -> float:
    """Forward + backward of the T · L layer applications (no head: the loss is a sum of the states)."""
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(**CONFIG))
    model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, use_cache=False, compute_logits=False)
        sum(h.sum() for h in out.step_hidden_states).backward()
    return counter.get_total_flops() / SEQ


@pytest.mark.parametrize("checkpointing", ["none", "layer", "step+layer"])
def test_hardware_flops_count_the_recomputed_forwards(checkpointing):
    config = tiny_config(**CONFIG)
    head = 8 * config.vocab_size * config.hidden_size  # forward, backward and the loss's recompute of the head
    expected = hardware_flops_per_token(config, SEQ, checkpointing) - head
    assert counted_layer_stack_flops_per_token(checkpointing) == pytest.approx(expected, rel=0.03)
