"""The training loop of `ouro-train`.

    Trainer(cfg).train()

Set-up (the config's values were checked when it was composed; what needs the world size or the
file system is checked here before the model is built):
  process group -> batch geometry -> tokenizer -> data (rank 0 prepares the cache, the others reuse it)
  -> model (pretrained or random; activation checkpointing) -> LoRA / gate freezing -> DeepSpeed engine
  -> `output_dir/model/` (config, tokenizer, adapter config) -> resume from the newest complete checkpoint
  (written on another number of processes or ZeRO stage: through its universal copy, `train/universal.py`;
  whether it is needed is known before the engine is built, since DeepSpeed's config says so). Its settings
  are compared with this run's once the data is prepared, before the model is built (`train/resume_check.py`).

One optimizer step:
  take `grad_accum` micro-batches; all-reduce their supervised-token count N over the ranks; for each
  micro-batch, forward, objective sum, and `engine.backward(sum · grad_accum · world / N)` (DeepSpeed
  divides by grad_accum and averages over ranks, so the gradient is that of Σ token losses / N: the
  result does not depend on how the batch is split); `engine.step()`; log; evaluate; checkpoint.

Sequence parallelism (`parallel.sequence_parallel_size=N`, `model/sequence_parallel.py`): groups of N
consecutive ranks read the same rows (the loader's data-parallel world is world / N, so the global
batch still counts rows) and each rank computes its S/N tokens of every row; attention exchanges q, k, v
within the group. Each rank's objective sums the losses of its own targets (its labels carry one label
of look-ahead, so a target is on exactly one rank), and N counts every target of the step once. The
normalisation then stays as above: the backward of the all-to-alls carries each rank's loss gradient
to the ranks whose tokens it attended to, so the parameter gradients summed over all ranks are the
gradient of Σ token losses, and DeepSpeed's average over all `world` ranks is undone by the factor
`world`. (DeepSpeed's own sequence-parallel mode, `mpu=deepspeed.runtime.sequence_parallel.parallel_state_sp`,
sums over the same ranks and divides by world / N instead: the same gradient. It is not used because
that `mpu` aliases the model-parallel size to N, and the engine records it as the tensor-parallel
degree of every ZeRO checkpoint (`_checkpoint_parallel_metadata`), the degree the universal conversion
for a resume on another topology splits by.)
ZeRO partitions over all ranks either way, so checkpoints have the layout of a run without SP and
resume on any topology as those do. Evaluation during training runs without SP: every rank scores
its own eval rows whole (no gradients: far less memory than a training step).

Checkpoints every `checkpoint.every_n_steps` and, with `checkpoint.every_n_minutes`, when any rank's clock
says so (one all-reduce with the stop flag below, so every rank saves the same step).
SIGTERM / SIGINT: finish the current step, save a checkpoint, exit 0. A non-finite loss: the step is
not applied (DeepSpeed skips a step whose gradient norm is not finite) and counted; `max_bad_steps` in a
row stops the run with an error.

The trainer only trains: `ouro-train` (cli.py) exports after a completed run.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ouro_train.config import ZERO3_COMPILE, ModelInit, Objective, RunConfig, to_plain_dict
from ouro_train.data import MicroBatchLoader, load_tokenizer, prepare, split_sources
from ouro_train.model import OuroConfig, OuroForCausalLM
from ouro_train.model.flops import hardware_flops_utilization, model_flops_utilization, peak_bf16_flops
from ouro_train.model.loss import IGNORE_INDEX, evaluate_loss_per_step
from ouro_train.run_dir import RunDir
from ouro_train.train import checkpoint, jit_ops, memory, run_lock, trainable
from ouro_train.train.batch import batch_geometry, total_steps
from ouro_train.train.engine import (
    bf16_enabled,
    build_ds_config,
    check_sequence_parallel,
    init_distributed,
    loraplus_param_groups,
    param_groups,
    scheduler_factory,
    sequence_parallel_group,
)
from ouro_train.train.lora import count_parameters
from ouro_train.train.metrics import MetricsLogger
from ouro_train.train.resume_check import check_resume, optimizer_settings, reapply_optimizer_settings
from ouro_train.train.state import TrainState
from ouro_train.train.universal import ensure_universal


class StopTraining(RuntimeError):
    """The run cannot go on (repeated non-finite losses); `ouro-train` reports it and exits 1."""


class Trainer:
    def __init__(self, cfg: RunConfig, evaluators: Sequence[Callable[[torch.nn.Module, object], dict]] = ()):
        """`evaluators`: extra metrics of each evaluation, called as `evaluator(model, tokenizer)` on every
        rank (e.g. `ouro-train`'s generation benchmark)."""
        self.cfg = cfg
        self.evaluators = list(evaluators)
        self.rank, self.local_rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.run_dir = RunDir(cfg.output_dir)
        run_lock.hold_for_run(self.run_dir.root)  # one run per output_dir, before anything in it is touched
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        # What the config alone could not tell is checked before data or weights are touched.
        self._check_model_path()
        sp = cfg.parallel.sequence_parallel_size
        if sp > 1:
            config = trainable.architecture(cfg)
            check_sequence_parallel(sp, self.world, config.num_attention_heads, config.num_key_value_heads)
        self.sp = sequence_parallel_group(sp)
        self.dp_rank, self.dp_world = self.rank // sp, self.world // sp  # the data-parallel view of the ranks
        self.geometry = batch_geometry(cfg.train, cfg.data.max_seq_len, self.dp_world)
        self.grad_accum = self.geometry.grad_accum
        self.topology = checkpoint.Topology.of(self.world, cfg.deepspeed)
        self.resume_from = checkpoint.resolve_resume(cfg.resume, self.run_dir, log=self._log)
        random_frozen_base = cfg.model.init == ModelInit.random and (
            cfg.lora.enabled or cfg.objective.name == Objective.gate)
        self._universal = self.resume_from is not None and checkpoint.needs_universal(
            self.resume_from, self.topology, random_frozen_base=random_frozen_base)
        self._ds_config = build_ds_config(cfg.deepspeed, cfg.optim, micro_batch=cfg.train.micro_batch_size,
                                          grad_accum=self.grad_accum, world_size=self.world,
                                          load_universal=self._universal)
        torch.manual_seed(cfg.seed + self.rank)

        self.tokenizer = load_tokenizer(cfg.model, cfg.data.cache_dir)
        self.train_data = self._prepare("train")
        self.eval_data = self._prepare("eval") if split_sources(cfg.data, "eval") else None
        loader = MicroBatchLoader(self.train_data, cfg.train.micro_batch_size, rank=self.dp_rank,
                                  world_size=self.dp_world, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                  pad_to_multiple_of=math.lcm(8, sp))
        self.total_steps = total_steps(cfg.max_steps, cfg.train.epochs, self.geometry, len(self.train_data))
        # What the checkpoint was trained with against this run: refused here, before any weights.
        self.resume_check = check_resume(self.resume_from, cfg, self.total_steps, self.geometry.sequences_per_step,
                                         self.train_data, log=self._log)

        self.executed_flops_per_token: float | None = None  # traced with the checkpointing policy (GPU, or auto)
        model = self._build_model()
        self.engine = self._build_engine(model)
        self.lm_head = self.engine.module.get_output_embeddings()
        trained, total = count_parameters(self.engine.module)
        self.trainable_params = trained
        self._log(f"parameters: {trained:,} trainable of {total:,} ({100 * trained / total:.2f}%)")
        if self.device.type == "cuda" and peak_bf16_flops(torch.cuda.get_device_name(self.device)) is None:
            self._log(f"no bf16 peak FLOP/s known for {torch.cuda.get_device_name(self.device)!r}: MFU is not logged")

        self.state = TrainState(loader)
        self._resume()
        if self.is_main:
            self._write_model_dir()
        self.metrics = MetricsLogger(
            self.run_dir.metrics_file, enabled=self.is_main, total_steps=self.total_steps, start_step=self.state.step,
            wandb_cfg=cfg.wandb, run_config=to_plain_dict(cfg),
        )
        self._stop_signal: int | None = None
        self._step_losses = True  # set per optimizer step
        self._last_save = time.monotonic()  # checkpoint.every_n_minutes counts from here

    # ----------------------------------------------------------------------------------- set-up
    def _log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _prepare(self, split: str):
        # Rank 0 builds the cache; the others wait and then find it complete.
        if not self.is_main:
            dist.barrier()
        data = prepare(self.cfg.data, self.tokenizer, split, log=self._log)
        if self.is_main:
            dist.barrier()
        return data

    def _check_model_path(self) -> None:
        m = self.cfg.model
        if m.init == ModelInit.pretrained and not (m.path and Path(m.path, "config.json").exists()):
            raise ValueError(f"model.path={m.path!r} is not a checkpoint directory with a config.json "
                             "(model.init=pretrained needs one; model.init=random builds a new model)")

    def _build_model(self) -> torch.nn.Module:
        mcfg = self.cfg.model
        dtype = torch.bfloat16 if bf16_enabled(self.cfg.deepspeed) else torch.float32
        if self.cfg.deepspeed.zero_stage == 3:
            # Keeps transformers' ZeRO-3 hook alive: from_pretrained/from_config then build the model
            # already partitioned instead of materialising it on every rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self._ds_config)
        from transformers import AutoModelForCausalLM

        config = trainable.architecture(self.cfg)
        if mcfg.init == ModelInit.pretrained:
            model = AutoModelForCausalLM.from_pretrained(
                mcfg.path, config=config, dtype=dtype, attn_implementation=mcfg.attn_implementation.value
            )
        else:
            if config.vocab_size < len(self.tokenizer):
                raise ValueError(f"model vocab_size {config.vocab_size} < tokenizer size {len(self.tokenizer)}")
            torch.manual_seed(self.cfg.seed)  # identical random weights on every rank
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if not isinstance(model, OuroForCausalLM):
            raise ValueError(f"model.path={mcfg.path} is not an Ouro checkpoint (got {type(model).__name__})")
        compile = self.cfg.compiles(self.device.type)
        if mcfg.compile == "auto" and self.device.type == "cuda" and not compile:
            self._log(f"model.compile=auto: off under deepspeed.zero_stage=3 ({ZERO3_COMPILE})")
        return trainable.make_trainable(model, self._checkpointing(model.config), self.cfg.lora, self.cfg.objective,
                                        compile=compile)

    def _checkpointing(self, config: OuroConfig) -> str:
        """`model.checkpointing`, with `auto` resolved for this GPU's memory (plan.gpu_memory_gib off GPU).
        On a GPU the policy's executed FLOPs per token are traced too: the numerator of the logged HFU."""
        policy = self.cfg.model.checkpointing.value
        on_gpu = self.device.type == "cuda"
        if policy == "auto":
            gib = (torch.cuda.get_device_properties(self.device).total_memory / memory.GIB if on_gpu
                   else self.cfg.plan.gpu_memory_gib)
            policy, table = memory.resolve_auto(self.cfg, config, self.world, gib)
            self._log(memory.explain_choice(table, policy, gib))
            self.executed_flops_per_token = table[policy]["executed_flops_per_token"]
        elif on_gpu:
            shape = memory.step_shape(self.cfg, policy)
            self.executed_flops_per_token = memory.step_memory(config, shape, self.cfg.deepspeed,
                                                               self.world)["executed_flops_per_token"]
        return policy

    def _build_engine(self, model):
        import deepspeed

        optim, ratio = self.cfg.optim, self.cfg.lora.loraplus_lr_ratio
        groups = (param_groups(model, optim.weight_decay) if ratio is None
                  else loraplus_param_groups(model, optim.weight_decay, optim.lr, ratio))
        # Before the engine, one process at a time, past a stale build lock (see train/jit_ops.py).
        jit_ops.build_needed_ops(self._ds_config, on_gpu=self.device.type == "cuda", log=self._log)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self._ds_config,
            lr_scheduler=scheduler_factory(self.cfg.optim, self.total_steps),
        )
        return engine

    def _write_model_dir(self) -> None:
        """`output_dir/model/`: what export needs besides the weights."""
        out = self.run_dir.model_dir
        out.mkdir(parents=True, exist_ok=True)
        self._model_config().save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.run_dir.data_manifest_file.write_text(json.dumps(self.train_data.manifest, indent=2) + "\n")
        if self.cfg.lora.enabled:
            self.engine.module.peft_config["default"].save_pretrained(out)
            path = self.cfg.model.path if self.cfg.model.init == ModelInit.pretrained else None
            self.run_dir.base_model_file.write_text(json.dumps({"path": path}))

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        if self._universal:
            ensure_universal(path, log=self._log)
        settings = optimizer_settings(self.engine)  # this run's, before the checkpoint's replace them
        checkpoint.load(self.engine, path, self.state, universal=self._universal, seed=self.cfg.seed)
        if self.resume_check.reapply_optimizer:
            reapply_optimizer_settings(self.engine, settings)
        self._log(f"resumed from {path} at step {self.state.step}")
        saved = checkpoint.Topology.of_checkpoint(path)
        if saved != self.topology:
            rng = ("the per-rank RNG streams (dropout) cannot be carried over to another number of processes and "
                   "are re-seeded from seed, step and rank" if saved.world_size != self.world else
                   "so do the per-rank RNG streams")
            self._log(f"the checkpoint was written with {saved}, this run has {self.topology}: weights, optimizer, "
                      f"schedule and data position continue exactly; {rng}")

    # ----------------------------------------------------------------------------------- loop
    def _micro_batches(self) -> Iterator[dict]:
        while True:  # epochs; the loader's state follows every micro-batch taken
            yield from self.state.loader

    def train(self) -> bool:
        """Train to the last step; False when a signal stopped the run early (after a checkpoint)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._train()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.metrics.close()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _train(self) -> bool:
        c, state = self.cfg, self.state
        stream = self._micro_batches()
        self.engine.train()
        while state.step < self.total_steps:
            start = time.perf_counter()
            record = self._optimizer_step([next(stream) for _ in range(self.grad_accum)])
            record["tok_per_s"] = record["tokens"] / (time.perf_counter() - start)
            self._add_device_stats(record)
            self.metrics.log({"step": state.step, **record})
            if state.bad_steps_in_row >= c.train.max_bad_steps:
                raise StopTraining(
                    f"loss was not finite for {state.bad_steps_in_row} optimizer steps in a row (last: step "
                    f"{state.step}); stopping. Check the data and lower optim.lr."
                )
            if self._has_eval and c.eval.every_n_steps and state.step % c.eval.every_n_steps == 0:
                self.evaluate()
            stop, clock_due = self._collective_flags()
            if stop or clock_due or state.step == self.total_steps or state.step % c.checkpoint.every_n_steps == 0:
                self.save()
            if stop:
                self._log(f"stopped by signal {self._stop_signal} after step {state.step}; checkpoint saved")
                return False
        if self._has_eval and (not c.eval.every_n_steps or state.step % c.eval.every_n_steps):
            self.evaluate()  # the final evaluation, unless the last step just had one
        return True

    def _optimizer_step(self, micro_batches: list[dict]) -> dict:
        counts = [self._local_counts(mb) for mb in micro_batches]
        local = self._all_reduce(torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)],
                                              dtype=torch.float64))
        supervised, tokens = max(local[0].item(), 1.0), local[1].item()
        scale = self.grad_accum * self.world / supervised  # all `world` ranks, with or without SP (see above)
        lr = self.engine.get_lr()[0]
        sums: dict[str, torch.Tensor] = {}  # on the device: one host sync per step, not per micro-batch
        self._step_losses = self.state.step % self.cfg.train.log_every == 0  # logged as step state.step + 1
        for i, mb in enumerate(micro_batches):
            obj = self._forward(mb)
            self.engine.backward(obj.loss_sum * scale)
            for key, value in itertools.chain([("loss", obj.loss_sum)], obj.metric_sums.items()):
                sums[key] = sums.get(key, 0.0) + value.detach().double()
            if i == len(micro_batches) - 1:
                own_norm = self._zero0_grad_norm()
                self._drop_non_finite_step(sums["loss"])
            self.engine.step()
        names = sorted(sums)
        totals = self._all_reduce(torch.stack([sums[k] for k in names]))
        record = {k: v / supervised for k, v in zip(names, totals.tolist())}
        finite = math.isfinite(record["loss"])
        self.state.record_step(int(tokens), finite)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = own_norm if grad_norm is None else grad_norm
        return {
            **record,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": int(tokens),
            "supervised_tokens": int(supervised),
            "tokens_seen": self.state.tokens_seen,
            "bad_steps": self.state.bad_steps_total,
            "step_applied": finite and bool(self.engine.was_step_applied()),
        }

    def _zero0_grad_norm(self) -> float | None:
        """The gradient norm before clipping under ZeRO-0, where DeepSpeed's fp32 path clips without
        keeping the norm (get_global_grad_norm() stays None). The last backward already averaged the
        gradients over the ranks, so every rank holds the global gradient."""
        if self.cfg.deepspeed.zero_stage != 0 or hasattr(self.engine.optimizer, "_global_grad_norm"):
            return None  # DeepSpeed keeps it (ZeRO, or its bf16 optimizer)
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    def _drop_non_finite_step(self, local_loss: torch.Tensor) -> None:
        """ZeRO 1-3 skip an update whose gradient norm is not finite. Without ZeRO we neutralise it:
        zero gradients and a zero learning rate for this update leave the weights exactly unchanged."""
        if self.cfg.deepspeed.zero_stage != 0:
            return
        if math.isfinite(self._all_reduce(local_loss.reshape(1).double()).item()):
            return
        for param in self.engine.module.parameters():
            if param.grad is not None:
                param.grad.zero_()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = 0.0  # the scheduler sets the next update's lr again

    def _local_counts(self, mb: dict) -> tuple[int, int]:
        """(supervised targets, real tokens) this rank contributes to the step's totals: under sequence
        parallelism its shard's targets, and the row's tokens counted by the group's first rank only."""
        if self.sp is None:
            return mb["num_supervised_tokens"], mb["num_tokens"]
        supervised = int((self.sp.shard_labels(mb["labels"])[:, 1:] != IGNORE_INDEX).sum())
        return supervised, mb["num_tokens"] if self.sp.rank == 0 else 0

    def _forward(self, mb: dict):
        """The micro-batch's forward and objective; every step's loss on logging steps (`train.log_every`)."""
        return trainable.micro_batch_objective(self.engine, self.lm_head, mb, self.cfg.objective, self.device,
                                               sequence_parallel=self.sp, step_losses=self._step_losses)

    def _collective_flags(self) -> tuple[bool, bool]:
        """(a rank was signalled to stop, a rank's clock says a checkpoint is due), the same on every rank:
        one all-reduce, so all ranks save on the same step."""
        minutes = self.cfg.checkpoint.every_n_minutes
        clock_due = minutes is not None and time.monotonic() - self._last_save >= 60 * minutes
        flags = self._all_reduce(torch.tensor([self._stop_signal is not None, clock_due], dtype=torch.int32),
                                 dist.ReduceOp.MAX)
        stop, clock_due = bool(flags[0].item()), bool(flags[1].item())
        if stop and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another rank was signalled
        return stop, clock_due

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small host tensor (NCCL needs it on the GPU); returns it on the host."""
        moved = tensor.to(self.device, copy=True)  # on the CPU, `to` would return the tensor itself
        dist.all_reduce(moved, op=op)
        return moved.cpu()

    def _add_device_stats(self, record: dict) -> None:
        if self.device.type != "cuda":
            return
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        tok_per_s, name = record["tok_per_s"] / self.world, torch.cuda.get_device_name(self.device)
        mfu = model_flops_utilization(tok_per_s, self._model_config(), self.cfg.data.max_seq_len, name)
        if mfu is not None:  # an unknown device gets no MFU (said once at start)
            record["mfu"] = mfu
            record["hfu"] = hardware_flops_utilization(tok_per_s, self.executed_flops_per_token, name)

    # ----------------------------------------------------------------------------------- eval / save
    @property
    def _has_eval(self) -> bool:
        return self.eval_data is not None or bool(self.evaluators)

    def evaluate(self) -> dict:
        """Loss per recurrent step on the eval data (`model.loss`'s computation, summed over ranks) and
        the evaluators' metrics; `eval_loss` is the loss of the model's own T steps."""
        record = {"split": "eval", "step": self.state.step}
        if self.eval_data is not None:
            record.update(self._eval_loss())
        module = self.engine.module
        model = module.get_base_model() if self.cfg.lora.enabled else module
        for evaluator in self.evaluators:
            record.update(evaluator(model, self.tokenizer))
        self.metrics.log(record)
        return record

    def _eval_loss(self) -> dict:
        steps = self._model_config().total_ut_steps
        ut_steps = list(self.cfg.eval.ut_steps) or list(range(1, steps + 1))
        loader = MicroBatchLoader(self.eval_data, self.cfg.train.micro_batch_size, rank=self.rank,
                                  world_size=self.world, shuffle=False)
        batches = itertools.islice(loader, self.cfg.eval.max_batches) if self.cfg.eval.max_batches else loader
        result = evaluate_loss_per_step(self.engine.module, batches, sorted(set(ut_steps) | {steps}),
                                        chunk_tokens=self.cfg.objective.loss_chunk_tokens, all_reduce=dist.all_reduce)
        by_step = {row["ut_steps"]: row for row in result["per_step"]}
        record = {"eval_loss": by_step[steps]["loss"], "eval_ppl": by_step[steps]["ppl"],
                  "eval_exit_mean_step": by_step[steps]["exit_mean_step"],
                  "eval_exit_entropy": by_step[steps]["exit_entropy"], "eval_tokens": result["tokens"]}
        record.update({f"eval_loss_step{t}": by_step[t]["loss"] for t in ut_steps})
        return record

    def _model_config(self) -> OuroConfig:
        module = self.engine.module
        return (module.get_base_model() if self.cfg.lora.enabled else module).config

    def save(self) -> Path:
        metadata = {"world_size": self.world, "total_steps": self.total_steps, "config": to_plain_dict(self.cfg),
                    "precision": "bf16" if bf16_enabled(self.cfg.deepspeed) else "fp32",  # export.dtype=auto
                    **self.resume_check.metadata()}
        path = checkpoint.save(self.engine, self.run_dir, self.state, metadata, keep_last=self.cfg.checkpoint.keep_last)
        self._last_save = time.monotonic()
        return path

