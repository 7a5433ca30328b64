"""What the benchmarks share: model shapes and the packed input row."""

from __future__ import annotations

import torch

from ouro_train.model import OuroConfig

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 head_dim=32),
    "1.4b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, head_dim=128),
}


def bench_config(shape: str, steps: int, seq: int) -> OuroConfig:
    return OuroConfig(**SHAPES[shape], num_key_value_heads=None, total_ut_steps=steps,
                      max_position_embeddings=max(seq, 4096), pad_token_id=0)


def packed_row(seq: int, vocab: int, gen: torch.Generator):
    """One row of documents of 1/8..1/2 of the row each: (ids, position ids, labels), every token
    supervised except document starts."""
    lengths, left = [], seq
    while left:
        n = min(left, int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    ids = torch.randint(17, vocab, (1, seq), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions, ids.masked_fill(positions == 0, -100)
