"""Training FLOPs of an Ouro model, for MFU: the same accounting in the benchmarks and the trainer."""

from __future__ import annotations

from ouro_train.model.configuration import OuroConfig

# Dense bf16 matmul FLOP/s measured on the reference H100 80GB: the MFU denominator.
H100_BF16_PEAK_FLOPS = 785e12


def training_flops_per_token(config: OuroConfig, seq_len: int) -> float:
    """6 · (T · L · per-layer matmul params + head) + causal attention, recomputation not counted."""
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.resolved_head_dim
    layer = 2 * d * heads * head_dim + 2 * d * config.num_key_value_heads * head_dim + 3 * d * config.intermediate_size
    applications = config.total_ut_steps * config.num_hidden_layers
    attention = 6 * applications * seq_len * heads * head_dim  # half of the full 12·S·H·D: causal
    return 6 * (applications * layer + config.vocab_size * d) + attention
