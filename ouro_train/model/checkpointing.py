"""Activation checkpointing policies: which activations a training forward keeps for the backward and
which the backward recomputes.

A policy name (`model.checkpointing`, `set_activation_checkpointing`) is `none`, a region, or a
region with a selection:

    region[:keep]     region: layer | step | step+layer      keep: save_attn | save_matmul
    layer/k           one layer application in k is a (whole) checkpoint, the others keep everything

- `layer`: each of the T · L layer applications of a forward is a checkpoint: only its input is kept
  and its forward re-runs in the backward.
- `step`: each recurrent step (L layers and the final norm) is a checkpoint.
- `step+layer`: step checkpoints whose recompute checkpoints each layer again: only one input per step
  stays across the forward, and one per layer during a step's backward (the least memory; each layer
  runs three forwards).
- `:save_attn` (selective, torch's `create_selective_checkpoint_contexts`): the layer checkpoints keep
  the attention kernel's outputs (output and log-sum-exp), so the recompute skips attention, the part
  that grows with the length, and re-runs the projections, the MLP and the elementwise work.
- `:save_matmul`: they keep every matmul output too (projections, MLP, LoRA adapters): the recompute
  re-runs only elementwise work (RMSNorm, RoPE, SiLU and product, residual adds), no matmul FLOPs.
  The attention kernels recognised are SDPA's fused kernels and FlexAttention; the `eager` reference
  attention is plain matmuls (its S × S scores are kept by `save_matmul`, recomputed by `save_attn`).
- Random ops (LoRA dropout) are always recomputed; the checkpoint restores the RNG state first, so the
  recompute draws the forward's masks.

`CHECKPOINT_GRANULARITIES` lists every policy, from the most activation memory to the least (roughly:
the order between neighbours depends on the length).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    checkpoint,
    create_selective_checkpoint_contexts,
)

CHECKPOINT_GRANULARITIES = (
    "none",
    "layer/4",
    "layer/2",
    "layer:save_matmul",
    "layer:save_attn",
    "layer",
    "step",
    "step+layer:save_matmul",
    "step+layer:save_attn",
    "step+layer",
)

_aten = torch.ops.aten
# Fused attention kernels (output, log-sum-exp, ...) as the dispatcher sees them on CPU and CUDA.
_ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
}
_MATMUL_OPS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm}


def _is_attention(op) -> bool:
    if isinstance(op, torch._ops.HigherOrderOperator):
        return op.name() == "flex_attention"
    return getattr(op, "overloadpacket", None) in _ATTENTION_OPS


def _is_matmul(op) -> bool:
    return getattr(op, "overloadpacket", None) in _MATMUL_OPS


_KEEPS = {"save_attn": _is_attention, "save_matmul": lambda op: _is_attention(op) or _is_matmul(op)}


def _policy_fn(keeps):
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if keeps(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class _RerunRecomputedOps(_CachedTorchDispatchMode):
    """The recompute side of torch's selective checkpoint, matching only the kept ops: torch's own
    checks that the recompute issues the forward's ops in the same order, but ZeRO-3 gathers a layer's
    parameters again inside the recompute (other allocations and copies than in the forward). The kept
    ops (matmuls, attention) still come back in their forward order, one stored output each."""

    def __init__(self, keeps, storage) -> None:
        super().__init__(None, storage)
        self.keeps = keeps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.keeps(func):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _selective_contexts(keep: str):
    """(forward, recompute) dispatch modes of a selective checkpoint that keeps `keep`'s ops."""
    keeps = _KEEPS[keep]
    forward, recompute = create_selective_checkpoint_contexts(_policy_fn(keeps))
    return forward, _RerunRecomputedOps(keeps, recompute.storage)


def _selective_checkpoint(keep: str, layer, *args) -> torch.Tensor:
    return checkpoint(layer, *args, use_reentrant=False, context_fn=functools.partial(_selective_contexts, keep))


@functools.lru_cache(maxsize=None)
def _compiled_selective_checkpoint():
    """`_selective_checkpoint` compiled: a selective checkpoint wraps a compiled region from outside
    only in eager (its cache does not survive the compiled graph), so under compilation the checkpoint
    is traced with the layer and the compiler's partitioner applies the same policy. The layer is an
    argument: one graph serves every layer (their parameters are the graph's inputs)."""
    return torch.compile(_selective_checkpoint)


class _CurrentStep(threading.local):
    """The step checkpoint this thread is running (its first forward or its recompute; on CUDA the
    recompute runs on the backward's thread): the stores its layers' selective checkpoints share."""

    stores: dict | None = None
    recomputing = False

    @contextlib.contextmanager
    def running(self, stores: dict, recomputing: bool):
        previous = self.stores, self.recomputing
        self.stores, self.recomputing = stores, recomputing
        try:
            yield
        finally:
            self.stores, self.recomputing = previous


_CURRENT_STEP = _CurrentStep()


def _nested_selective_contexts(keep: str, storage: dict, recomputing: bool):
    """A layer's selective checkpoint inside a step checkpoint. Its first forward keeps nothing (kept
    outputs would live until the step's backward); the step's recompute fills `storage`, which the
    layer's own recompute, in the step's backward, then reads: the autograd graph the backward walks
    is the first forward's, so that checkpoint's recompute must read what the step's recompute kept."""
    keeps = _KEEPS[keep]
    if recomputing:
        forward, _ = create_selective_checkpoint_contexts(_policy_fn(keeps))
        forward.storage = storage
        return forward, contextlib.nullcontext()  # this checkpoint's graph is not the one walked
    return contextlib.nullcontext(), _RerunRecomputedOps(keeps, storage)


@dataclass(frozen=True)
class CheckpointingPolicy:
    """A parsed policy name: which regions are checkpoints and what a layer checkpoint keeps."""

    name: str
    step: bool = False  # each recurrent step is a checkpoint
    layer: bool = False  # layer applications are checkpoints
    keep: str | None = None  # None | "save_attn" | "save_matmul": outputs a layer checkpoint keeps
    every: int = 1  # one layer application in `every` is a checkpoint

    def checkpoints_layer(self, application: int) -> bool:
        """Whether layer application `application` (step · L + layer) runs as a checkpoint."""
        return self.layer and application % self.every == 0

    def run_step(self, stack, *args) -> torch.Tensor:
        """`stack(*args)` (one recurrent step's layers), as a checkpoint if this policy has step checkpoints."""
        if not self.step:
            return stack(*args)
        stores: dict = {}  # layer application -> what its selective checkpoint keeps, filled by the recompute

        def contexts():
            return _CURRENT_STEP.running(stores, False), _CURRENT_STEP.running(stores, True)

        return checkpoint(stack, *args, use_reentrant=False, context_fn=contexts)

    def run_layer(self, layer, application: int, *args) -> torch.Tensor:
        """`layer(*args)`, as a checkpoint of this policy where it checkpoints that application."""
        if not self.checkpoints_layer(application):
            return layer(*args)
        step = _CURRENT_STEP
        if self.keep is not None and step.stores is not None and layer._compiled_call_impl is None:
            storage = step.stores.setdefault(application, defaultdict(dict))
            context = functools.partial(_nested_selective_contexts, self.keep, storage, step.recomputing)
            return checkpoint(layer, *args, use_reentrant=False, context_fn=context)
        if self.keep is None or step.stores is not None:  # compiled layers in a step: whole checkpoints
            return checkpoint(layer, *args, use_reentrant=False)
        if layer._compiled_call_impl is not None:  # `compile_layers`: compile the checkpoint around the layer
            return _compiled_selective_checkpoint()(self.keep, layer, *args)
        return _selective_checkpoint(self.keep, layer, *args)

    def recomputed_forwards(self, applications: int) -> tuple[float, float]:
        """Forwards of the layer stack (`applications` = T · L layer applications) that the backward
        re-runs, as (matmul part, attention part): a step checkpoint re-runs the stack once; a layer
        checkpoint re-runs its application's matmuls unless it keeps them, and its attention unless
        it keeps that."""
        fraction = -(-applications // self.every) / applications if self.layer else 0.0
        matmul = fraction * (self.keep != "save_matmul")
        attention = fraction * (self.keep is None)
        return float(self.step) + matmul, float(self.step) + attention


def parse_policy(name: str) -> CheckpointingPolicy:
    """The policy called `name` (one of `CHECKPOINT_GRANULARITIES`)."""
    if name not in CHECKPOINT_GRANULARITIES:
        raise ValueError(f"activation checkpointing {name!r} not in {CHECKPOINT_GRANULARITIES}")
    return _policy(name)


@functools.lru_cache(maxsize=None)
def _policy(name: str) -> CheckpointingPolicy:
    if name == "none":
        return CheckpointingPolicy(name)
    region, _, keep = name.partition(":")
    region, _, every = region.partition("/")
    return CheckpointingPolicy(name, step=region.startswith("step"), layer=region.endswith("layer"),
                               keep=keep or None, every=int(every or 1))
