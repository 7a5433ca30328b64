"""Building blocks of the Ouro decoder: RMSNorm, rotary embedding, attention, SwiGLU MLP, and the
"sandwich" decoder layer with four norms (before and after each sublayer).

Numerics follow the upstream code exactly (see the architecture note): RMSNorm normalises in fp32 and
casts back before the weight multiply; RoPE tables are computed in fp32 and cast to the activation
dtype; rotate-half (NeoX) convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ouro_train.model.attention import AttentionPlan, attend
from ouro_train.model.configuration import OuroConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; one call per forward, shared by every layer and step.

    The inverse frequencies are kept out of the module's buffers on purpose: `model.to(bf16)` would
    otherwise round them, and upstream's `from_pretrained(dtype=bf16)` keeps them in fp32.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Built on the CPU explicitly: from_pretrained constructs modules under a meta-device context.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self._inv_freq_cpu = 1.0 / (theta**exponent)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_by_device[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B, S, D] broadcast over heads."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class OuroAttention(nn.Module):
    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: AttentionPlan,
        cache=None,
        cache_slot: int | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, cache_slot)
        sp = plan.sequence_parallel
        if sp is not None:  # this rank's tokens, all heads -> all tokens, this rank's heads
            q, k, v = sp.heads_from_sequence(q, k, v)
        out = attend(q, k, v, plan, scale=self.scale, dropout=self.dropout if self.training else 0.0)
        if sp is not None:
            out = sp.sequence_from_heads(out)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class OuroMLP(nn.Module):
    def __init__(self, config: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(nn.Module):
    """h = h + norm2(attn(norm1(h))); h = h + norm4(mlp(norm3(h)))."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = OuroAttention(config, layer_idx)
        self.mlp = OuroMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps)

    def forward(self, h, rope, plan: AttentionPlan, cache=None, cache_slot: int | None = None) -> torch.Tensor:
        h = h + self.input_layernorm_2(self.self_attn(self.input_layernorm(h), rope, plan, cache, cache_slot))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
