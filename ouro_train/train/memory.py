"""Peak memory per GPU of one training step, estimated without a GPU.

    peak = model states + max(activation peak of forward + backward, optimizer-step temporaries)

- **Activations** are traced, not modelled: one real forward + objective + backward of our model (with
  the recipe's checkpointing, objective and LoRA) runs under `FakeTensorMode`, so tensors carry shapes
  and dtypes but no data, and `StoragePeak` follows every storage as it is created and freed. A 1.4B
  model traces in about a minute per policy on a CPU (the op count, not the length, sets it). Under
  sequence parallelism the trace is of one rank of the group: S/N tokens through embeddings, norms,
  MLPs, gate and loss, and attention on all S tokens for H/N heads, with an all-to-all stand-in that
  creates the same buffers (one rank's exchange with itself: shapes, not data, matter here). The trace runs on fake *CPU* tensors: the
  CPU-only torch build cannot run autograd on fake CUDA tensors. Causal SDPA picks a flash kernel on
  both devices (output + log-sum-exp per query), so the activations are the same tensors the GPU holds.
  Only storages an operator creates count: a view of a parameter (`w.t()` inside `F.linear`) or of
  any other existing storage is no allocation.
- **Executed FLOPs** come from the same trace: torch's FLOP formulas (`FlopCount`) over the forward,
  the recomputed forwards of the checkpointing policy, the backward, the objective and its metrics. Causal attention
  counts half of the S × S products, as flash kernels skip the masked blocks.
- **Model states** follow DeepSpeed's ZeRO partitioning over the data-parallel world: bf16 parameters
  and gradients; fp32 master weights and Adam's two moments for the trainable parameters (fp32 training:
  fp32 parameters are the master copy). Stage 1 shards the optimizer states, stage 2 also the
  gradients (plus the reduce bucket they pass through), stage 3 also the parameters (plus the layers
  being gathered). Offloaded states live in host memory and are left out of the GPU figure.

Not counted: the CUDA context and cuBLAS/NCCL workspaces (outside torch's allocator, ~1 GiB) and the
caching allocator's fragmentation; `torch.cuda.max_memory_allocated` does not count them either.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ouro_train.config import DeepSpeedConfig, LoraConfig, ObjectiveConfig, RunConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroConfig, OuroForCausalLM
from ouro_train.model.attention import document_block_mask_bytes
from ouro_train.model.flops import training_flops_per_token
from ouro_train.model.sequence_parallel import SequenceParallel
from ouro_train.train import trainable

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
    step_losses: bool = False  # every recurrent step's loss computed (a logging step: train.log_every)

    @property
    def tokens(self) -> int:
        """Tokens of the rows this rank computes (its shard under sequence parallelism)."""
        return self.micro_batch_size * self.seq_len // self.sequence_parallel


@dataclass(frozen=True)
class StepTrace:
    """What one traced step of one rank holds and computes."""

    activation_bytes: int  # peak above the parameters (and, below ZeRO-2, with the whole gradients)
    executed_flops: float  # forward + recomputation + backward + objective, this rank's tokens
    flops_by_op: dict = field(default_factory=dict, compare=False)


def step_memory(config: OuroConfig, shape: StepShape, ds: DeepSpeedConfig, world_size: int,
                trace: StepTrace | None = None) -> dict[str, int]:
    """Bytes per GPU by component, and `peak`: model states + the larger of the activation peak
    (forward + backward) and the optimizer step's fp32 gradient partition; `executed_flops_per_token`
    from the same trace. `trace` reuses an earlier trace of the same shape and ZeRO stage (the trace
    does not depend on the world size); `trace` in the result is the one used."""
    model = meta_model(config, shape)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest_module = max(p.numel() for p in model.parameters())  # embedding / head: the largest gathered module
    states = model_state_bytes(total, trained, largest_module, ds, world_size, shape.bf16)
    # Below stage 2 every gradient is kept whole, so it appears during backward while activations are
    # freed: trace them together. From stage 2 on they pass through a preallocated partition.
    whole_grads = ds.zero_stage < 2
    if trace is None:
        trace = trace_step(model, shape, keep_grads=whole_grads)
    activations = max(0, trace.activation_bytes - states["gradients"]) if whole_grads else trace.activation_bytes
    # Packed rows on the GPU attend under a document block mask, built once per forward for the whole
    # row (on every sequence-parallel rank) and held until the backward ends. The traced rows are one
    # document each, so it is added here (an upper bound where the kernel needs no mask).
    activations += document_block_mask_bytes(shape.micro_batch_size, shape.seq_len)
    step_temporaries = 4 * _shard(trained, world_size if ds.zero_stage >= 1 else 1) if shape.bf16 else 0
    states["activations"] = activations
    states["peak"] = sum(states.values()) - activations + max(activations, step_temporaries)
    states["executed_flops_per_token"] = trace.executed_flops / shape.tokens
    states["trace"] = trace
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
    """The model of the step on the meta device, made trainable as the trainer makes it: shapes and
    parameter counts, no memory."""
    with torch.device("meta"):
        model = OuroForCausalLM(config).to(torch.bfloat16 if shape.bf16 else torch.float32)
    return trainable.make_trainable(model, shape.checkpointing, shape.lora, shape.objective)


def trace_step(model: nn.Module, shape: StepShape, keep_grads: bool = False) -> StepTrace:
    """One forward + objective + backward traced under FakeTensorMode: the peak bytes above the
    model's parameters and the FLOPs executed. Without `keep_grads` each parameter gradient is dropped
    as soon as it is accumulated, as ZeRO-2/3 move it into their reduce bucket (a model state of its own)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        hooks = [] if keep_grads else [
            p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad
        ]
        targets = shape.seq_len // shape.sequence_parallel if shape.sequence_parallel > 1 else shape.seq_len - 1
        with StoragePeak() as tracker, FlopCount() as counter, _SupervisedCount(shape.micro_batch_size * targets):
            run_step(model, shape)
        for hook in hooks:
            hook.remove()
    return StepTrace(tracker.peak, float(sum(counter.by_op.values())), dict(counter.by_op))


class FlopCount(TorchDispatchMode):
    """FLOPs of the operators run inside this mode, by operator, with torch's FLOP formulas (matmuls,
    convolutions, attention). Unlike torch's `FlopCounterMode` it runs every operator as it is (that
    one decomposes operators it has no formula for, which changes the storages the memory trace sees)
    and keeps no module hierarchy."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        self.formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in ATTENTION_FLOPS.items()}}
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            name = str(func._overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + int(formula(*args, **kwargs, out_val=out))
        return out


def _attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """Q·Kᵀ and P·V of SDPA on [B, H, S, D] shapes; half of them under a causal mask."""
    batch, heads, q_len, head_dim = query
    products = 2 * batch * heads * q_len * key[-2] * (head_dim + value[-1])
    return products // 2 if is_causal else products


def _attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                              *args, out_shape=None, **kwargs) -> int:
    """dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: twice the forward's products."""
    return 2 * _attention_flops(query, key, value, dropout_p, is_causal)


# The fake trace runs on the CPU, whose flash kernel torch's FLOP counter does not know.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


class StoragePeak(TorchDispatchMode):
    """The peak of the bytes held by storages that operators create inside this mode, each freed when
    its last tensor goes (fake or real tensors alike). An output sharing the storage of an input (a
    view, an in-place result) allocates nothing, so parameters and other storages made before the
    mode never count. Blocks are rounded as CUDA's caching allocator rounds them. (torch's
    `MemTracker` does this and more, but its module hooks fail inside the no-grad and recomputed
    regions of our objective.)"""

    BLOCK = 512

    def __enter__(self):
        self.live, self.peak, self._seen = 0, 0, WeakIdKeyDictionary()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
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
    first of the row supervised): the trainer's `trainable.micro_batch_objective`. Returns the loss."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (shape.micro_batch_size, shape.seq_len), device=device, generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    # rank 0 of a sequence-parallel group: its shard of the row, its targets
    sp = _SelfExchange(None, 0, shape.sequence_parallel) if shape.sequence_parallel > 1 else None
    result = trainable.micro_batch_objective(model, model.get_output_embeddings(), {"input_ids": ids, "labels": labels},
                                             shape.objective, device, sequence_parallel=sp,
                                             step_losses=shape.step_losses)
    loss = result.loss_sum / result.num_tokens.clamp_min(1)
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------ for a recipe
# Memory a training process cannot use on each card (GiB as torch reports the card's total): the CUDA
# context and cuBLAS/NCCL workspaces live outside torch's allocator.
CONTEXT_RESERVE_GIB = 1.5
CARDS_GIB = {"40 GB": 39.4, "80 GB": 79.2, "141 GB": 139.8}  # A100 40GB, H100 80GB, H200
COMPONENTS = ("parameters", "gradients", "optimizer", "activations")


def step_shape(run: RunConfig, checkpointing: str, seq_len: int | None = None) -> StepShape:
    return StepShape(seq_len=seq_len or run.data.max_seq_len, micro_batch_size=run.train.micro_batch_size,
                     checkpointing=checkpointing, objective=run.objective, lora=run.lora,
                     bf16=run.deepspeed.bf16 is not False, sequence_parallel=run.parallel.sequence_parallel_size,
                     step_losses=run.train.log_every == 1)


def fits(peak_bytes: int, gpu_gib: float) -> bool:
    return peak_bytes / GIB + CONTEXT_RESERVE_GIB <= gpu_gib


def policy_table(run: RunConfig, config: OuroConfig, world_size: int,
                 policies: tuple[str, ...] = CHECKPOINT_GRANULARITIES) -> dict[str, dict]:
    """The checkpointing policies the model offers, traced at the run's shape: each one's `step_memory`
    (bytes, `executed_flops_per_token`) plus `model_flops_per_token` (MFU's count, no recomputation)."""
    model_flops = training_flops_per_token(config, run.data.max_seq_len)
    table = {}
    for policy in policies:
        estimate = step_memory(config, step_shape(run, policy), run.deepspeed, world_size)
        table[policy] = dict(estimate, model_flops_per_token=model_flops)
    return table


def resolve_auto(run: RunConfig, config: OuroConfig, world_size: int, gpu_gib: float) -> tuple[str, dict[str, dict]]:
    """`auto` for a run about to train: (the chosen policy, the policies traced). `none` recomputes
    nothing, so no policy executes fewer FLOPs: when it fits, the others need no trace."""
    table = policy_table(run, config, world_size, policies=("none",))
    if not fits(table["none"]["peak"], gpu_gib):
        table = policy_table(run, config, world_size)
    return choose_checkpointing(table, gpu_gib), table


def choose_checkpointing(table: dict[str, dict], gpu_gib: float) -> str:
    """`model.checkpointing=auto`: of the policies whose estimated peak fits `gpu_gib`, the one that
    executes the fewest FLOPs; on a tie the one listed first in `CHECKPOINT_GRANULARITIES` (the
    FLOP count leaves out elementwise work, which `layer:save_matmul` still recomputes and `none`
    does not). When none fits, the smallest peak, so the error is an out-of-memory the estimate foresaw."""
    fitting = [p for p, row in table.items() if fits(row["peak"], gpu_gib)]
    if not fitting:
        return min(table, key=lambda p: table[p]["peak"])
    order = {p: i for i, p in enumerate(CHECKPOINT_GRANULARITIES)}
    return min(fitting, key=lambda p: (round(table[p]["executed_flops_per_token"], -3), order.get(p, len(order))))


def explain_choice(table: dict[str, dict], chosen: str, gpu_gib: float) -> str:
    """Why `auto` chose `chosen`: one line per policy (peak, executed ÷ model FLOPs, fits)."""
    fitting = any(fits(row["peak"], gpu_gib) for row in table.values())
    reason = (f"the fewest executed FLOPs of the policies whose estimated peak fits {gpu_gib:g} GiB" if fitting else
              f"no policy fits {gpu_gib:g} GiB (+{CONTEXT_RESERVE_GIB} GiB CUDA context): the smallest peak")
    return "\n".join([f"model.checkpointing=auto: {chosen} ({reason})", format_policy_table(table, gpu_gib, chosen)])


def format_policy_table(table: dict[str, dict], gpu_gib: float, chosen: str | None = None) -> str:
    lines = [f"  {'policy':<14}{'peak GiB':>9}{'executed/model FLOPs':>22}  fits {gpu_gib:g} GiB"]
    for policy, row in table.items():
        ratio = row["executed_flops_per_token"] / row["model_flops_per_token"]
        mark = "  <- chosen" if policy == chosen else ""
        lines.append(f"  {policy:<14}{row['peak'] / GIB:>9.2f}{ratio:>22.3f}  "
                     f"{'yes' if fits(row['peak'], gpu_gib) else 'no'}{mark}")
    return "\n".join(lines)


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
