"""Training FLOPs of an Ouro model and the devices' peak FLOP/s, for MFU and HFU: the same accounting
in the benchmarks, the trainer and the dry run's plan.

MFU counts the model FLOPs (forward + backward, no recomputation); HFU the FLOPs executed, which the
dry run counts with torch's FLOP counter over a traced step (train/memory.py) for any checkpointing
policy. `hardware_flops_per_token` is the closed form of that count for the whole-layer/step policies.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop, sdpa_flop

from ouro_train.model.checkpointing import parse_policy
from ouro_train.model.configuration import OuroConfig

# Dense bf16 tensor-core peak FLOP/s from the vendors' data sheets (no sparsity), by a substring of
# `torch.cuda.get_device_name()`; the first match wins, so the more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),  # 40 GB and 80 GB, SXM and PCIe
    ("L40S", 362e12),
    ("B200", 2250e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in the table (then no MFU is reported)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def model_flops_utilization(tok_per_s: float, config: OuroConfig, seq_len: int, device_name: str) -> float | None:
    """Training tokens/s of one device as a fraction of its bf16 peak (None: device not in the table)."""
    peak = peak_bf16_flops(device_name)
    return None if peak is None else tok_per_s * training_flops_per_token(config, seq_len) / peak


def hardware_flops_utilization(tok_per_s: float, executed_flops_per_token: float, device_name: str) -> float | None:
    """HFU: the FLOPs the device executes (recomputation included; the dry run's traced count) per
    second as a fraction of its bf16 peak, beside MFU's model FLOPs (None: device not in the table)."""
    peak = peak_bf16_flops(device_name)
    return None if peak is None else tok_per_s * executed_flops_per_token / peak


def training_flops_per_token(config: OuroConfig, seq_len: int) -> float:
    """6 · (T · L · per-layer matmul params + head) + causal attention, recomputation not counted: the
    model FLOPs of MFU."""
    return 3 * _layer_forward_flops(config, seq_len) + 6 * config.vocab_size * config.hidden_size


def hardware_flops_per_token(config: OuroConfig, seq_len: int, checkpointing: str) -> float:
    """What the GPU computes per training token: the model FLOPs, the parts of the layer stack's forward
    that the checkpointing policy recomputes, and the head's forward recomputed by the chunked loss."""
    applications = config.total_ut_steps * config.num_hidden_layers
    matmul, attention = parse_policy(checkpointing).recomputed_forwards(applications)
    recomputed = matmul * _layer_matmul_flops(config) + attention * _layer_attention_flops(config, seq_len)
    return training_flops_per_token(config, seq_len) + recomputed + 2 * config.vocab_size * config.hidden_size


def _layer_forward_flops(config: OuroConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the T · L layer applications: matmuls and causal attention."""
    return _layer_matmul_flops(config) + _layer_attention_flops(config, seq_len)


def _layer_matmul_flops(config: OuroConfig) -> float:
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.resolved_head_dim
    layer = 2 * d * heads * head_dim + 2 * d * config.num_key_value_heads * head_dim + 3 * d * config.intermediate_size
    return 2 * config.total_ut_steps * config.num_hidden_layers * layer


def _layer_attention_flops(config: OuroConfig, seq_len: int) -> float:
    applications = config.total_ut_steps * config.num_hidden_layers
    # Causal: half of the 4 · S · H · D of QK^T and PV over the whole square.
    return 2 * applications * seq_len * config.num_attention_heads * config.resolved_head_dim


# torch's FLOP counter knows SDPA's CUDA kernels but not its CPU flash kernel (what causal and masked
# SDPA run on the CPU): without these, FLOPs counted on the CPU would leave attention out.
for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, sdpa_flop),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, sdpa_backward_flop)):
    if _op not in flop_registry:
        register_flop_formula(_op, get_raw=True)(_formula)  # the formulas come shape-wrapped
