"""MFU's denominator: the dense bf16 peak by device name; an unknown device gets none."""

import pytest

from conftest import tiny_config
from ouro_train.model.flops import model_flops_utilization, peak_bf16_flops, training_flops_per_token


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


def test_mfu_is_tokens_times_flops_over_peak():
    config = tiny_config()
    flops = training_flops_per_token(config, 512)
    assert model_flops_utilization(1000.0, config, 512, "NVIDIA H200") == pytest.approx(1000.0 * flops / 989e12)
    assert model_flops_utilization(1000.0, config, 512, "Unknown GPU") is None
