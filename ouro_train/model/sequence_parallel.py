"""Ulysses sequence parallelism for the LoopLM: N ranks share one packed row, S/N tokens each.

Every per-token computation (embedding, the four norms of a layer, the MLP, the final norm, the exit
gate, the loss) runs on the rank's own S/N tokens. Attention needs every token of the row, so around
each attention call the projected queries, keys and values go through an all-to-all from sequence
shards to head shards: rank r then holds all S tokens of heads [r·H/N, (r+1)·H/N) (and the matching
KV heads, so grouped-query heads stay with their KV head), attends with the row's full mask (packed
documents, causal), and a second all-to-all returns its output to sequence shards before `o_proj`.
RoPE is applied before the exchange, from each token's own position id (positions restart per
document), so it is the same rotation as without SP. A looped model pays this T·L times per forward
(96 for Ouro-1.4B with T = 4), plus again in every recomputed step or layer.

    sp = SequenceParallel(group, rank=dist.get_rank(group), size=N)
    out = model(input_ids=row, position_ids=positions, sequence_parallel=sp, compute_logits=False)
    # out.step_hidden_states, out.gate_logits: this rank's S/N tokens; labels: sp.shard_labels(labels)

The model takes the full row (ids and position ids, [B, S]) and keeps its own shard: the attention
plan needs the whole row's document boundaries, and position ids are cheap next to activations.

Which all-to-all: our own, a `torch.distributed.all_to_all_single` inside an autograd Function (its
backward is the same exchange in reverse). DeepSpeed's Ulysses `DistributedAttention` /
`_SeqAllToAll` work in a [B, S, H, D] layout and exchange q, k and v in three separate collectives;
our attention works in [B, H, S, D] (what SDPA and FlexAttention take), so using them costs two layout
copies per tensor per call, and here q, k and v travel in ONE all-to-all (3 → 1 launches, 96 × per
forward). `_SeqAllToAll` is also private API. The DeepSpeed engine's sequence-parallel `mpu` is not
used either: `ouro_train.train.trainer` says why, and how the gradient normalisation comes out the same
without it.

The process group is passed in; this module knows nothing of how groups are formed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ouro_train.model.loss import IGNORE_INDEX


@dataclass
class AllToAllTimer:
    """Wall time spent inside the all-to-alls (forward, backward and recomputation), for benchmarks.
    On CUDA each timed call synchronises the device: the exchanges are blocking anyway."""

    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in a sequence-parallel group: `size` ranks holding one row between them,
    this one holding tokens [rank·S/size, (rank+1)·S/size)."""

    group: object  # torch.distributed ProcessGroup of the `size` ranks
    rank: int
    size: int
    timer: AllToAllTimer | None = field(default=None, compare=False)

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"sequence-parallel rank {self.rank} outside a group of {self.size}")

    # ------------------------------------------------------------------ sharding of the row
    def local(self, seq: int) -> slice:
        """This rank's tokens of a row of `seq` tokens."""
        if seq % self.size:
            raise ValueError(f"a row of {seq} tokens does not split into {self.size} sequence-parallel shards")
        n = seq // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> this rank's [B, S/size, ...]."""
        return x[:, self.local(x.shape[1])]

    def shard_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels [B, S] (aligned with the inputs) -> [B, S/size + 1]: this rank's labels and the next
        token's (the first of the next shard; -100 after the row's end). Position i predicts token i+1,
        so the last token of a shard predicts the first of the next one; with this one label of
        look-ahead, `loss.supervised_targets` gives exactly this shard's targets, each target of the row
        on one rank."""
        part = self.local(labels.shape[1])
        padded = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
        return padded[:, part.start : part.stop + 1]

    # ------------------------------------------------------------------ attention exchange
    def heads_from_sequence(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors [B, h_i, S/N, D] (this rank's tokens, all heads) -> [B, h_i/N, S, D] (all tokens,
        this rank's heads), in one all-to-all."""
        n = self.size
        batch, _, s, dim = xs[0].shape
        heads = [x.shape[1] // n for x in xs]
        # [B, N, sum h_i/N, s, D]: the chunk for rank j holds its heads of every tensor.
        send = torch.cat([x.reshape(batch, n, h, s, dim) for x, h in zip(xs, heads)], dim=2)
        recv = self._all_to_all(send.transpose(0, 1))  # [N (source = sequence shard), B, sum h_i/N, s, D]
        full = recv.permute(1, 2, 0, 3, 4).reshape(batch, sum(heads), n * s, dim)
        return tuple(full.split(heads, dim=1))

    def sequence_from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h/N, S, D] (all tokens, this rank's heads) -> [B, h, S/N, D] (this rank's tokens)."""
        n = self.size
        batch, h, seq, dim = x.shape
        send = x.reshape(batch, h, n, seq // n, dim).permute(2, 0, 1, 3, 4)  # [N (destination), B, h, s, D]
        recv = self._all_to_all(send)  # [N (source = head shard), B, h, s, D]
        return recv.transpose(0, 1).reshape(batch, n * h, seq // n, dim)

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...]: chunk j goes to rank j; the result's chunk j came from rank j."""
        return _AllToAll.apply(x, self.group, self.timer)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, timer: AllToAllTimer | None) -> torch.Tensor:
        ctx.group, ctx.timer = group, timer
        return _exchange(x, group, timer)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The exchange is a permutation of chunks between ranks: its adjoint is the same exchange.
        return _exchange(grad, ctx.group, ctx.timer), None, None


def _exchange(x: torch.Tensor, group, timer: AllToAllTimer | None) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    timed_on_cuda = timer is not None and x.is_cuda
    if timed_on_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, group=group)
    if timer is None:
        return out
    if timed_on_cuda:
        torch.cuda.synchronize(x.device)
    timer.seconds += time.perf_counter() - start
    timer.calls += 1
    timer.bytes += x.numel() * x.element_size()
    return out
