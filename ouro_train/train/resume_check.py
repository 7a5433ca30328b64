"""What a resume may change: the checkpoint's resolved config (its `trainer_state.json`) against this run's.

Settings that define the training trajectory (optimizer, schedule, batch, data and its content, seed,
objective, model, LoRA, precision) must be the same: a difference stops the run before any weights are
built or loaded, listing each as `key: old → new`. The others (`APPLIED`: logging, evaluation, checkpoint
cadence, where things are written, resources and parallel layout) take their new values, and the
changes are logged.

The schedule's length (`max_steps`, `train.epochs`) may change only where the schedule does not depend
on it: constant after a fixed warmup (`optim.min_lr_ratio=1` with `optim.warmup_steps` set, or no
warmup). Under a decaying schedule the multiplier of every later step would be recomputed over the new
total and the learning rate jump, so a changed total is refused there.

`resume_allow_changes=[optim.lr, data, ...]` (dotted keys or whole sections; `data.content` for the
training data's content, `max_steps` for the schedule's length) lets a resume through such differences.
They are then applied: the optimizer's hyperparameters restored from the checkpoint are replaced by
this run's (lr through the schedule's base rates, so warmup and decay continue from the current step),
and the change is recorded with its step in `trainer_state.json` (`config_changes`), which the model
card lists.

The training data's content is compared through the SHA-256 of the prepared rows (tokens, supervision
and the packing), recorded in each checkpoint: other data under the same path and row count is caught.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ouro_train.config import RunConfig, to_plain_dict
from ouro_train.data.cache import PreparedData, content_sha256
from ouro_train.run_dir import trainer_state_file

# Keys (or sections) whose change leaves the trajectory alone: applied on resume, and logged.
APPLIED = (
    "output_dir", "resume", "resume_allow_changes", "dry_run", "export_at_end", "export", "wandb", "eval",
    "checkpoint", "plan", "data.num_proc", "data.cache_dir", "data.eval_files", "data.eval_sources",
    "model.checkpointing", "model.compile", "model.attn_implementation", "train.micro_batch_size",
    "train.max_bad_steps", "parallel", "deepspeed.zero_stage", "deepspeed.offload_optimizer",
    "deepspeed.offload_params", "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size",
    "deepspeed.stage3_param_persistence_threshold",
)
SCHEDULE_LENGTH = ("max_steps", "train.epochs")  # compared through the total number of optimizer steps
DATA_CONTENT = "data.content"
BATCH = "train.global_batch"  # sequences per optimizer step, however they are set (or implied by the world size)
ABSENT = object()


class ResumeRefused(ValueError):
    """The checkpoint was trained with other trajectory-defining settings."""


@dataclass
class ResumeCheck:
    """The outcome of the comparison: what this run records, and whether the optimizer must be re-set."""

    sequences_per_step: int
    data_fingerprint: str
    history: list = field(default_factory=list)  # every resume's allowed changes so far, with its step
    reapply_optimizer: bool = False

    def metadata(self) -> dict:
        """What each checkpoint's trainer_state.json records besides the config."""
        return {"sequences_per_step": self.sequences_per_step, "data_fingerprint": self.data_fingerprint,
                "config_changes": self.history}


def data_fingerprint(prepared: PreparedData) -> str:
    """SHA-256 of the prepared rows (recorded in the manifest when the data is prepared; computed here
    for data prepared before that)."""
    return prepared.manifest.get("content_sha256") or content_sha256(prepared.path)


def check_resume(checkpoint: Path | None, run: RunConfig, total_steps: int, sequences_per_step: int,
                 prepared: PreparedData, log: Callable[[str], None]) -> ResumeCheck:
    """Compare `checkpoint`'s record with this run; raises ResumeRefused before anything is loaded."""
    result = ResumeCheck(sequences_per_step, data_fingerprint(prepared))
    if checkpoint is None:
        return result
    saved = json.loads(trainer_state_file(checkpoint).read_text())
    result.history = list(saved.get("config_changes", []))
    old, new = _flatten(saved["config"]), _flatten(to_plain_dict(run))
    allowed = list(run.resume_allow_changes)
    _check_allowed_keys(allowed, set(old) | set(new))

    changed = {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
               if old.get(k, ABSENT) != new.get(k, ABSENT) and not _under(k, SCHEDULE_LENGTH)}
    derived = {DATA_CONTENT: (saved.get("data_fingerprint"), result.data_fingerprint),
               BATCH: (saved.get("sequences_per_step"), sequences_per_step)}
    changed.update({k: v for k, v in derived.items() if v[0] is not None and v[0] != v[1]})
    if saved.get("data_fingerprint") is None:
        log(f"{checkpoint} records no training-data fingerprint: the data's content is not compared")

    applied = {k: v for k, v in changed.items() if _under(k, APPLIED)}
    refused, reasons = {k: v for k, v in changed.items() if k not in applied}, {}
    if saved.get("total_steps") not in (None, total_steps):
        key = next((k for k in SCHEDULE_LENGTH if old.get(k, ABSENT) != new.get(k, ABSENT)), "total optimizer steps")
        lengths = (old.get(key), new.get(key)) if key in old else (saved["total_steps"], total_steps)
        if schedule_extends(run):
            applied[key] = lengths
        else:
            refused[key] = lengths
            reasons[key] = (f"the total optimizer steps go {saved['total_steps']} → {total_steps}, and this schedule is "
                            "laid over the total (its learning rate would jump); a constant schedule "
                            "(optim.min_lr_ratio=1 with optim.warmup_steps set) extends")
    overridden = {k: v for k, v in refused.items() if _under(k, allowed)}
    refused = {k: v for k, v in refused.items() if k not in overridden}
    if refused:
        lines = [f"  {_line(k, v)}" + (f"  ({reasons[k]})" if k in reasons else "") for k, v in refused.items()]
        keys = ",".join(refused)
        raise ResumeRefused(
            f"resume from {checkpoint}: these settings define the training trajectory and differ from the "
            "checkpoint's:\n" + "\n".join(lines) + "\nPut them back, train into a new output_dir (or resume=none), "
            f"or resume anyway with resume_allow_changes=[{keys}] (recorded in trainer_state.json and the model card)")
    if applied:
        log("resume applies changed settings: " + "; ".join(_line(k, applied[k]) for k in sorted(applied)))
    if overridden:
        log("resume_allow_changes: trajectory-defining settings changed at step "
            f"{saved['step']}: " + "; ".join(_line(k, v) for k, v in overridden.items()))
        result.history.append({"step": saved["step"], "changes": {k: [_plain(a), _plain(b)] for k, (a, b) in overridden.items()}})
    result.reapply_optimizer = any(_under(k, ("optim", *SCHEDULE_LENGTH)) for k in {**applied, **overridden})
    return result


def schedule_extends(run: RunConfig) -> bool:
    """Whether the learning-rate multiplier of each step is independent of the total number of steps."""
    o = run.optim
    return o.min_lr_ratio == 1.0 and (o.warmup_steps is not None or o.warmup_ratio == 0)


def optimizer_settings(engine) -> list[dict]:
    """This run's optimizer hyperparameters per parameter group (taken before a checkpoint replaces them)."""
    return [{k: g[k] for k in ("initial_lr", "betas", "eps", "weight_decay") if k in g}
            for g in engine.lr_scheduler.optimizer.param_groups]


def reapply_optimizer_settings(engine, settings: list[dict]) -> None:
    """Put this run's hyperparameters back after the checkpoint's were loaded; the schedule's base rates
    become this run's lr, and the current rate is the schedule's at the restored step."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(settings):
        raise ResumeRefused(f"the checkpoint has {len(groups)} optimizer parameter groups, this run {len(settings)}")
    scheduler.base_lrs = [s["initial_lr"] for s in settings]
    for group, values, multiplier, base in zip(groups, settings, scheduler.lr_lambdas, scheduler.base_lrs):
        group.update(values)
        group["lr"] = base * multiplier(scheduler.last_epoch)


def _check_allowed_keys(allowed: list[str], keys: set[str]) -> None:
    known = keys | {DATA_CONTENT, BATCH, *SCHEDULE_LENGTH}
    for entry in allowed:
        if not any(k == entry or k.startswith(entry + ".") for k in known):
            raise ResumeRefused(f"resume_allow_changes: {entry!r} is no setting (dotted keys such as optim.lr, "
                                f"sections such as data, or {DATA_CONTENT})")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        items = enumerate(node)
    else:
        return {prefix.rstrip("."): node}
    out = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _plain(value: Any) -> Any:
    return None if value is ABSENT else value


def _show(value: Any) -> str:
    return "(absent)" if value is ABSENT else value if isinstance(value, str) else json.dumps(value)


def _line(key: str, change: tuple) -> str:
    return f"{key}: {_show(change[0])} → {_show(change[1])}"
