"""Training FLOPs of an Ouro model and the devices' peak FLOP/s, for MFU and HFU: the same accounting
in the benchmarks, the trainer and the dry run's plan.

MFU counts the model FLOPs (forward + backward, no recomputation); HFU the FLOPs executed, which the
dry run counts with torch's FLOP counter over a traced step (train/memory.py) for any checkpointing
policy. `hardware_flops_per_token` is the closed form of that count for the whole-layer/step policies.
"""

from __future__ import annotations

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


# Forward passes of the layer stack recomputed in backward: `step+layer` recomputes each step, and
# inside that recompute each layer's backward recomputes the layer once more.
RECOMPUTED_FORWARDS = {"none": 0, "layer": 1, "step": 1, "step+layer": 2}


def hardware_flops_per_token(config: OuroConfig, seq_len: int, checkpointing: str) -> float:
    """What the GPU computes per training token: the model FLOPs, the layer stack's recomputed
    forwards, and the head's forward recomputed by the chunked loss."""
    recomputed = RECOMPUTED_FORWARDS[checkpointing] * _layer_forward_flops(config, seq_len)
    return training_flops_per_token(config, seq_len) + recomputed + 2 * config.vocab_size * config.hidden_size


def _layer_forward_flops(config: OuroConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the T · L layer applications: matmuls and causal attention."""
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.resolved_head_dim
    layer = 2 * d * heads * head_dim + 2 * d * config.num_key_value_heads * head_dim + 3 * d * config.intermediate_size
    applications = config.total_ut_steps * config.num_hidden_layers
    attention = 2 * applications * seq_len * heads * head_dim  # half of the full 4·S·H·D: causal
    return 2 * applications * layer + attention
