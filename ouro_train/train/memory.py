"""Peak memory per GPU of one training step, estimated without a GPU.

    peak = model states + max(activation peak of forward + backward, optimizer-step temporaries)

- **Activations** are traced, not modelled: one real forward + objective + backward of our model (with
  the recipe's checkpointing, objective and LoRA) runs under `FakeTensorMode`, so tensors carry shapes
  and dtypes but no data, and torch's `MemTracker` follows every storage as it is created and freed.
  A 1.4B model at 32K tokens traces in seconds on a CPU. Under sequence parallelism the trace is of
  one rank of the group: S/N tokens through embeddings, norms, MLPs, gate and loss, and attention on all
  S tokens for H/N heads, with an all-to-all stand-in that creates the same buffers (one rank's
  exchange with itself: shapes, not data, matter here). The trace runs on fake *CPU* tensors: the
  CPU-only torch build cannot run autograd on fake CUDA tensors. Causal SDPA picks a flash kernel on
  both devices (output + log-sum-exp per query), so the activations are the same tensors the GPU holds.
- **Model states** follow DeepSpeed's ZeRO partitioning over the data-parallel world: bf16 parameters
  and gradients; fp32 master weights and Adam's two moments for the trainable parameters (fp32 training:
  fp32 parameters are the master copy). Stage 1 shards the optimizer states, stage 2 also the
  gradients (plus the reduce bucket they pass through), stage 3 also the parameters (plus the layers
  being gathered). Offloaded states live in host memory and are left out of the GPU figure.

Known over-count (ZeRO-2/3): in the fake trace a parameter's gradient stays alive after
`_drop_grad` releases it (seen with a 1024² linear layer: one weight-sized storage left live), so
the activation figure can include up to one copy of the gradients (2.7 GiB for Ouro-1.4B in bf16):
an upper bound until that is found. `tests/cuda` compares against the measured peak.

Not counted: the CUDA context and cuBLAS/NCCL workspaces (outside torch's allocator, ~1 GiB) and the
caching allocator's fragmentation; `torch.cuda.max_memory_allocated` does not count them either.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ouro_train.config import DeepSpeedConfig, LoraConfig, ModelInit, Objective, ObjectiveConfig, RunConfig
from ouro_train.model import OuroConfig, OuroForCausalLM
from ouro_train.model.attention import document_block_mask_bytes
from ouro_train.model.configuration import RELEASED_ARCHITECTURES
from ouro_train.model.sequence_parallel import SequenceParallel
from ouro_train.train.lora import apply_lora

GIB = 2**30
ADAM_MOMENTS = 2
# Stage 3 gathers the module that runs and prefetches the next; sized as the largest (embedding, head).
ZERO3_GATHERED_MODULES = 2


@dataclass(frozen=True)
class StepShape:
    """What one training step of one rank looks like, as far as memory is concerned."""

    seq_len: int
    micro_batch_size: int = 1
    checkpointing: str = "none"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bf16: bool = True
    sequence_parallel: int = 1  # ranks sharing each row (Ulysses): this rank holds seq_len / N of it


def step_memory(config: OuroConfig, shape: StepShape, ds: DeepSpeedConfig, world_size: int,
                activations: int | None = None) -> dict[str, int]:
    """Bytes per GPU by component, and `peak`: model states + the larger of the activation peak
    (forward + backward) and the optimizer step's fp32 gradient partition. `activations` reuses the
    result of an earlier call with the same shape and ZeRO stage (the trace does not depend on the world size)."""
    model = meta_model(config, shape)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest_module = max(p.numel() for p in model.parameters())  # embedding / head: the largest gathered module
    states = model_state_bytes(total, trainable, largest_module, ds, world_size, shape.bf16)
    # Below stage 2 every gradient is kept whole, so it appears during backward while activations are
    # freed: trace them together. From stage 2 on they pass through a preallocated partition.
    whole_grads = ds.zero_stage < 2
    if activations is None:
        activations = activation_peak_bytes(model, shape, keep_grads=whole_grads)
        if whole_grads:
            activations = max(0, activations - states["gradients"])
        # Packed rows on the GPU attend under a document block mask, built once per forward for the whole
        # row (on every sequence-parallel rank) and held until the backward ends. The traced rows are one
        # document each, so it is added here (an upper bound where the kernel needs no mask).
        activations += document_block_mask_bytes(shape.micro_batch_size, shape.seq_len)
    step_temporaries = 4 * _shard(trainable, world_size if ds.zero_stage >= 1 else 1) if shape.bf16 else 0
    states["activations"] = activations
    states["peak"] = sum(states.values()) - activations + max(activations, step_temporaries)
    return states


def model_state_bytes(total: int, trainable: int, largest_module: int, ds: DeepSpeedConfig, world_size: int,
                      bf16: bool) -> dict[str, int]:
    """DeepSpeed ZeRO's per-rank model states (bytes) for `total` parameters of which `trainable` train."""
    stage, n = ds.zero_stage, world_size
    weight_bytes = 2 if bf16 else 4
    params = weight_bytes * (_shard(total, n) + ZERO3_GATHERED_MODULES * largest_module if stage == 3 else total)
    grads = weight_bytes * (_shard(trainable, n) + min(ds.reduce_bucket_size, trainable) if stage >= 2 else trainable)
    master = 4 * trainable if bf16 else 0  # fp32 copy of the trained weights
    moments = 4 * ADAM_MOMENTS * trainable
    optimizer = _shard(master + moments, n) if stage >= 1 else master + moments
    if ds.offload_optimizer:
        optimizer = 0
    if ds.offload_params:
        params = weight_bytes * ZERO3_GATHERED_MODULES * largest_module
    return {"parameters": params, "gradients": grads, "optimizer": optimizer}


def _shard(count: int, world_size: int) -> int:
    return math.ceil(count / world_size)


def meta_model(config: OuroConfig, shape: StepShape) -> nn.Module:
    """The model of the step on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        model = OuroForCausalLM(config).to(torch.bfloat16 if shape.bf16 else torch.float32)
    model.config.use_cache = False
    model.set_activation_checkpointing(shape.checkpointing)
    if shape.lora.enabled:
        model = apply_lora(model, shape.lora)
    if shape.objective.name == Objective.gate:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("model.early_exit_gate."))
    return model


def activation_peak_bytes(model: nn.Module, shape: StepShape, keep_grads: bool = False) -> int:
    """Peak bytes above the model's parameters during one forward + objective + backward, traced under
    FakeTensorMode. Without `keep_grads` each parameter gradient is dropped as soon as it is
    accumulated, as ZeRO-2/3 move it into their reduce bucket (a model state of its own)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        hooks = [] if keep_grads else [
            p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad
        ]
        targets = shape.seq_len // shape.sequence_parallel if shape.sequence_parallel > 1 else shape.seq_len - 1
        with StoragePeak() as tracker, _SupervisedCount(shape.micro_batch_size * targets):
            run_step(model, shape)
        for hook in hooks:
            hook.remove()
    return tracker.peak


class StoragePeak(TorchDispatchMode):
    """The peak of the bytes held by storages that operators create inside this mode, each freed when
    its last tensor goes (fake or real tensors alike). Blocks are rounded as CUDA's caching allocator
    rounds them. (torch's `MemTracker` does this and more, but its module hooks fail inside the
    no-grad and recomputed regions of our objective.)"""

    BLOCK = 512

    def __enter__(self):
        self.live, self.peak, self._seen = 0, 0, WeakIdKeyDictionary()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._hold(t.untyped_storage())
        return out

    def _hold(self, storage) -> None:
        if storage in self._seen:
            return
        size = -(-storage.nbytes() // self.BLOCK) * self.BLOCK
        self._seen[storage] = size
        weakref.finalize(storage, self._release, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def _release(self, size: int) -> None:
        self.live -= size


class _SupervisedCount(TorchDispatchMode):
    """Fake tensors have no values, so selecting the supervised positions (a boolean mask) has no
    size; `run_step` supervises every predicting position, and this answers with that count."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            return torch.empty((self.count, args[0].dim()), dtype=torch.long, device=args[0].device)
        if func in _BOOL_INDEXING_OPS:  # the forward selection and its backward
            args = (args[0], self._as_positions(args[1]), *args[2:])
        return func(*args, **(kwargs or {}))

    def _as_positions(self, indices):
        positions = []
        for index in indices:
            if index is not None and index.dtype == torch.bool:
                positions += [torch.empty(self.count, dtype=torch.long, device=index.device)] * index.dim()
            else:
                positions.append(index)
        return positions


class _SelfExchange(SequenceParallel):
    """A sequence-parallel rank whose all-to-all is a copy: the buffers of the real exchange, no group."""

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return _Copy.apply(x)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(memory_format=torch.contiguous_format)


_BOOL_INDEXING_OPS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                      torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default)


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def run_step(model: nn.Module, shape: StepShape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward + objective + backward of one micro-batch of packed random tokens (every token but the
    first of the row supervised), as the trainer runs it. Returns the loss."""
    from ouro_train.train.objectives import compute_objective

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (shape.micro_batch_size, shape.seq_len), device=device, generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    kwargs = {}
    if shape.sequence_parallel > 1:  # rank 0 of a group: its shard of the row, its targets
        kwargs["sequence_parallel"] = _SelfExchange(None, 0, shape.sequence_parallel)
        labels = kwargs["sequence_parallel"].shard_labels(labels)
    out = model(input_ids=ids, use_cache=False, compute_logits=False, **kwargs)
    result = compute_objective(shape.objective, out, labels, model.get_output_embeddings())
    loss = result.loss_sum / result.num_tokens.clamp_min(1)
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------ for a recipe
# Memory a training process cannot use on each card (GiB as torch reports the card's total): the CUDA
# context and cuBLAS/NCCL workspaces live outside torch's allocator.
CONTEXT_RESERVE_GIB = 1.5
CARDS_GIB = {"40 GB": 39.4, "80 GB": 79.2, "141 GB": 139.8}  # A100 40GB, H100 80GB, H200
# Cheapest first: no recomputation, then one recomputed forward (per layer keeps less than per step),
# then two.
CHECKPOINTING_BY_COST = ("none", "layer", "step", "step+layer")


def planned_model_config(run: RunConfig) -> OuroConfig:
    """The architecture a run trains: `plan.model_size` when set, else the one the trainer would build
    (model.path's config.json, or the class defaults for `model.init=random`), else Ouro-1.4B (a
    recipe planned before its checkpoint is at hand); `model.config_overrides` on top."""
    m = run.model
    if run.plan.model_size is not None:
        config = OuroConfig(**{**RELEASED_ARCHITECTURES[run.plan.model_size.value], **m.config_overrides})
    elif m.path and Path(m.path, "config.json").exists():
        config = OuroConfig.from_pretrained(m.path, **m.config_overrides)
    elif m.init == ModelInit.random:
        config = OuroConfig(**m.config_overrides)
    else:
        config = OuroConfig(**{**RELEASED_ARCHITECTURES["1.4b"], **m.config_overrides})
    config._attn_implementation = m.attn_implementation.value
    return config


def step_shape(run: RunConfig, checkpointing: str, seq_len: int | None = None) -> StepShape:
    return StepShape(seq_len=seq_len or run.data.max_seq_len, micro_batch_size=run.train.micro_batch_size,
                     checkpointing=checkpointing, objective=run.objective, lora=run.lora,
                     bf16=run.deepspeed.bf16 is not False, sequence_parallel=run.parallel.sequence_parallel_size)


def fits(peak_bytes: int, gpu_gib: float) -> bool:
    return peak_bytes / GIB + CONTEXT_RESERVE_GIB <= gpu_gib


def choose_checkpointing(run: RunConfig, config: OuroConfig, world_size: int, gpu_gib: float) -> str:
    """`model.checkpointing=auto`: the cheapest granularity whose estimated peak fits `gpu_gib`
    (the strongest one when none fits, so the error is an out-of-memory the estimate foresaw)."""
    for granularity in CHECKPOINTING_BY_COST:
        if fits(step_memory(config, step_shape(run, granularity), run.deepspeed, world_size)["peak"], gpu_gib):
            return granularity
    return CHECKPOINTING_BY_COST[-1]


def longest_seq_len(config: OuroConfig, run: RunConfig, checkpointing: str, world_size: int, gpu_gib: float,
                    at: dict[str, int]) -> int:
    """The longest max_seq_len (a multiple of 256) whose peak fits `gpu_gib`. Every activation grows
    linearly with the length (flash attention keeps O(S) per query; the loss is chunked), so the peak
    traced at the configured length (`at`) and at half of it fixes the line."""
    seq, sp = run.data.max_seq_len, run.parallel.sequence_parallel_size
    half_len = max(2 * sp, seq // 2 // sp * sp)  # still whole shards under sequence parallelism
    if half_len >= seq:
        return seq
    half = step_memory(config, step_shape(run, checkpointing, half_len), run.deepspeed, world_size)["peak"]
    per_token = (at["peak"] - half) / (seq - half_len)
    if per_token <= 0:
        return seq
    longest = seq + ((gpu_gib - CONTEXT_RESERVE_GIB) * GIB - at["peak"]) / per_token
    return max(0, int(longest) // 256 * 256)
