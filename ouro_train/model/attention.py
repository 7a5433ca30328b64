"""Attention kernels and the per-forward plan that says which one runs with which mask.

One `AttentionPlan` is built per forward pass and shared by every layer of every recurrent step
(T·L attention calls), so mask construction costs nothing per layer.

Kernels:
- `sdpa`  (default): `F.scaled_dot_product_attention`, `is_causal` when no mask is needed, else a
  boolean mask (padding, packed documents, sliding window, multi-token continuation of a cache).
- `eager` (reference): explicit softmax in fp32 over bf16 scores with an additive mask.
- `flex`: PyTorch FlexAttention with a document block mask. Chosen automatically for packed batches
  on CUDA (or always with `attn_implementation="flex_attention"`); a packed batch anywhere else falls
  back to SDPA with a block-diagonal causal mask. The block mask is built per tile from the documents'
  boundaries (`document_block_mask`): its size grows with (S / 128)², never S².

Packed batches: documents packed into one row are given by `position_ids` that restart at 0 (or by
cumulative sequence lengths, converted to such position ids by the model). No token attends across a
document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = flex_attention = None

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
BLOCK_SIZE = 128  # FlexAttention's default tile: the document mask is kept per BLOCK_SIZE² tile


@dataclass
class AttentionPlan:
    kernel: str  # "sdpa" | "eager" | "flex"
    mask: torch.Tensor | None = None  # bool [B, 1, S, K] (True = attend); None with is_causal / no mask
    is_causal: bool = False
    block_mask: "BlockMask | None" = None
    # Ulysses sequence parallelism (`sequence_parallel.SequenceParallel`): the layer holds S/N tokens and
    # exchanges q, k, v for head shards around the kernel; the mask above is the whole row's.
    sequence_parallel: object = None


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Per-token document index from position ids that restart at 0, or None for one document per row."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    return torch.cat([torch.zeros_like(position_ids[:, :1]), restarts.long().cumsum(-1)], dim=-1)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, total] position ids restarting at each boundary of cumulative sequence lengths."""
    cu = cu_seqlens.to(torch.long)
    if cu[0] != 0 or cu[-1] != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seq_lens must rise from 0 to the token count {total}, got {cu.tolist()}")
    idx = torch.arange(total, device=cu.device)
    starts = cu[torch.searchsorted(cu, idx, right=True) - 1]
    return (idx - starts)[None]


def plan_attention(
    implementation: str,
    *,
    batch_size: int,
    q_len: int,
    past_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> AttentionPlan:
    """Decide kernel and mask for one forward pass.

    `attention_mask` is the usual 2D [B, past_len + q_len] padding mask (1 = real token).
    `doc_ids` [B, q_len] marks packed documents (only without a cache).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask must be 2D [batch, past + new tokens] = [*, {kv_len}], got {tuple(attention_mask.shape)}"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    if doc_ids is not None and past_len:
        raise ValueError("packed documents (position ids restarting at 0) are not supported on top of a KV cache")

    use_flex = (
        doc_ids is not None
        and attention_mask is None
        and sliding_window is None
        and flex_attention is not None
        and (implementation == "flex_attention" or (implementation == "sdpa" and device.type == "cuda"))
    )
    if use_flex:
        return AttentionPlan("flex", block_mask=document_block_mask(doc_ids))

    kernel = "eager" if implementation == "eager" else "sdpa"
    needs_mask = attention_mask is not None or doc_ids is not None or sliding_window is not None
    if not needs_mask and (past_len == 0 or q_len == 1):
        # The common cases: causal prefill/training, or one new token that sees the whole cache.
        if kernel == "eager" and q_len > 1:
            return AttentionPlan(kernel, mask=_causal_mask(q_len, 0, device)[None, None].expand(batch_size, 1, -1, -1))
        return AttentionPlan(kernel, is_causal=q_len > 1)

    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None].expand(batch_size, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if sliding_window is not None:
        allowed = allowed & ((q_pos - k_pos) < sliding_window)[None, None]
    # A query with nothing to attend to (a left-padding position) attends to itself: finite garbage that
    # nothing reads, instead of NaN that would poison the batch.
    allowed = allowed | (k_pos == q_pos)[None, None]
    return AttentionPlan(kernel, mask=allowed)


def _causal_mask(q_len: int, past_len: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    return torch.arange(past_len + q_len, device=device)[None, :] <= q_pos


def document_block_mask(doc_ids: torch.Tensor, block_size: int = BLOCK_SIZE) -> "BlockMask":
    """FlexAttention's causal document mask for packed rows `doc_ids` [B, S], built at block granularity
    on doc_ids' device: nothing S × S exists, only per-block tables ((S / block_size)² entries).

    Documents are contiguous runs of ids, so the keys the queries of block i may see are one range:
    from the first token of the document holding the block's first query up to the block's last query.
    Of those kv blocks, the ones strictly below the diagonal that lie inside that document are full
    (no mask evaluated) when all of block i is that document too; the others are partial, and the
    mask_mod decides per element. A last block shorter than block_size is partial (its missing tail is
    masked), as in `create_block_mask`. Block sizes must be > 1 (the diagonal block is partial)."""
    batch, seq = doc_ids.shape
    device = doc_ids.device
    blocks = -(-seq // block_size)
    token = torch.arange(seq, device=device)
    starts_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(starts_doc, token, 0).cummax(dim=1).values  # first token of each token's document

    block = torch.arange(blocks, device=device)
    first_q = block * block_size
    last_q = (first_q + block_size).clamp(max=seq) - 1
    start = doc_start[:, first_q]  # [B, blocks]: the earliest key any query of the block sees
    lowest = start // block_size  # first kv block that is not empty
    one_doc = (doc_ids[:, first_q] == doc_ids[:, last_q]) & (first_q + block_size <= seq)
    full_lo = torch.where(one_doc, -(-start // block_size), block)  # full blocks: [full_lo, i)
    entry = torch.arange(blocks, device=device)[:, None]  # [blocks (entry), 1] against [B, 1, blocks (row)]

    def table(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32)[:, None]  # [B, 1, ...]: one mask for every head

    # Partial blocks: [lowest, full_lo) (the whole range when the block spans documents, else at most
    # the block holding the document's unaligned start), then the diagonal block.
    kv_indices = torch.where(entry < (full_lo - lowest)[:, None, :], lowest[:, None, :] + entry, block)
    full_indices = (full_lo[:, None, :] + entry).clamp(max=blocks - 1)
    # The mask_mod indexes padded ids: the kernel may ask about positions up to blocks · block_size.
    padded = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(batch, blocks * block_size - seq)], dim=1)

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (padded[b, q_idx] == padded[b, kv_idx])

    return BlockMask.from_kv_blocks(
        table(full_lo - lowest + 1), table(kv_indices.transpose(1, 2)),
        table(block - full_lo), table(full_indices.transpose(1, 2)),
        BLOCK_SIZE=block_size, mask_mod=doc_causal, seq_lengths=(seq, seq),
    )


def document_block_mask_bytes(batch: int, seq: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes `document_block_mask` keeps for B rows of S tokens: int32 tile tables by query row and by
    key column, partial and full ((S / block_size)² entries each), and the padded document ids."""
    blocks = -(-seq // block_size)
    return batch * (4 * 4 * (blocks * blocks + blocks) + 8 * blocks * block_size)


@lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    # Compiled FlexAttention on GPU; the eager reference elsewhere (correct, slow; used by CPU tests).
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, KVH, K, D] -> [B, H, S, D]."""
    gqa = q.shape[1] != k.shape[1]
    if plan.kernel == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.mask, dropout_p=dropout, is_causal=plan.is_causal, scale=scale, enable_gqa=gqa
        )
    if plan.kernel == "flex":
        return _flex_kernel(q.device.type)(q, k, v, block_mask=plan.block_mask, scale=scale, enable_gqa=gqa)
    return _eager_attention(q, k, v, plan, scale=scale, dropout=dropout)


def _eager_attention(q, k, v, plan: AttentionPlan, *, scale: float, dropout: float) -> torch.Tensor:
    if q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if plan.mask is not None:
        bias = torch.zeros(plan.mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill(~plan.mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)
