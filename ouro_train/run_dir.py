"""The layout of a training run's `output_dir`: the one place that names its files, and the only module
that knows DeepSpeed's own checkpoint file names.

    output_dir/model/                      config.json (OuroConfig) + tokenizer files, data_manifest.json
                                           (the prepared training data's counts per source); LoRA runs also
                                           the peft adapter_config.json and base_model.json ({"path": base
                                           model directory, or null for a random init})
    output_dir/checkpoints/step-NNNNNNNN/  DeepSpeed's checkpoint (module, optimizer and scheduler states,
                                           ZeRO shards), one rank{r}.pt per process (data-loader position,
                                           RNG states), trainer_state.json, and an empty COMPLETE marker
                                           written last: a directory without it is never read
    output_dir/checkpoints/step-NNNNNNNN/universal/
                                           the same checkpoint in DeepSpeed's universal format (one file per
                                           parameter and state, any world size under ZeRO-1/2/3 loads it),
                                           made once when a run resumes on another topology; its own
                                           COMPLETE marker, written before it is renamed from universal.tmp
    output_dir/metrics.jsonl               one JSON object per optimizer step or evaluation
    output_dir/export/                     the inference export made after the last step
    output_dir/.hydra/                     Hydra's record of the recipe and the command-line overrides
    output_dir/run.lock                    flock'ed by rank 0 for as long as a run lives: one run per
                                           output_dir; it names the holder's host and pid

The trainer writes through it, resume and `ouro-export` read through it.
"""

from __future__ import annotations

import re
from pathlib import Path

COMPLETE = "COMPLETE"
RUN_LOCK = "run.lock"
TRAINER_STATE = "trainer_state.json"
BASE_MODEL_FILE = "base_model.json"
DATA_MANIFEST_FILE = "data_manifest.json"  # the training split's manifest, for the export's model card
ADAPTER_CONFIG_FILE = "adapter_config.json"  # written by peft's LoraConfig.save_pretrained
_TAG = re.compile(r"^step-(\d{8})$")

# DeepSpeed's names inside a checkpoint directory (`engine.save_checkpoint(root, tag)`).
_DS_MODULE_STATES = "mp_rank_00_model_states.pt"  # the whole module below ZeRO-3
_DS_ZERO3_MODULE_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: rank 0's partitions
_DS_OPTIM_STATES = "*_optim_states.pt"  # one per rank under ZeRO >= 1
_DS_LATEST_UNIVERSAL = "latest_universal"  # written by ds_to_universal beside its output; we pass tags instead
_DS_UNIVERSAL_PARAMS = "zero"  # universal format: zero/<parameter name>/{fp32,exp_avg,exp_avg_sq,step}.pt
_DS_UNIVERSAL_STEP = "step.pt"
UNIVERSAL = "universal"


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory holds, from its name (None: not a checkpoint directory)."""
    match = _TAG.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def rank_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank{rank}.pt"


def trainer_state_file(checkpoint: Path) -> Path:
    return checkpoint / TRAINER_STATE


def module_states_file(checkpoint: Path) -> Path:
    """DeepSpeed's module states file: every parameter below ZeRO-3 (frozen ones included)."""
    return checkpoint / _DS_MODULE_STATES


def has_zero_shards(checkpoint: Path) -> bool:
    """Whether DeepSpeed wrote partitioned optimizer states (ZeRO stage >= 1)."""
    return any(checkpoint.glob(_DS_OPTIM_STATES))


def universal_dir(checkpoint: Path) -> Path:
    """Where `checkpoint`'s universal-format copy lives (complete once it exists: it is renamed into place)."""
    return checkpoint / UNIVERSAL


def universal_tmp_dir(checkpoint: Path) -> Path:
    return checkpoint / f"{UNIVERSAL}.tmp"


def latest_universal_file(output_folder: Path) -> Path:
    """The pointer DeepSpeed's converter writes in its output folder's parent."""
    return output_folder.parent / _DS_LATEST_UNIVERSAL


def is_universal(path: Path) -> bool:
    return (path / _DS_UNIVERSAL_PARAMS).is_dir()


def zero3_module_states_file(checkpoint: Path) -> Path:
    """The module states file of a ZeRO-3 checkpoint's rank 0 (the optimizer-independent engine state)."""
    return checkpoint / _DS_ZERO3_MODULE_STATES


def universal_params_dir(universal: Path) -> Path:
    """One folder per parameter, named as in the module, and optimizer_state.pt."""
    return universal / _DS_UNIVERSAL_PARAMS


def universal_step_file(universal: Path, name: str) -> Path:
    return universal / _DS_UNIVERSAL_PARAMS / name / _DS_UNIVERSAL_STEP


def universal_optimizer_file(universal: Path) -> Path:
    """A universal checkpoint's optimizer state without the tensors (parameter groups, step, loss scale)."""
    return universal / _DS_UNIVERSAL_PARAMS / "optimizer_state.pt"


def universal_param_file(universal: Path, name: str) -> Path:
    """A parameter's fp32 master weights in a universal checkpoint (a dict with the tensor under "param")."""
    return universal / _DS_UNIVERSAL_PARAMS / name / "fp32.pt"


class RunDir:
    """`output_dir` of one training run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def base_model_file(self) -> Path:
        return self.model_dir / BASE_MODEL_FILE

    @property
    def adapter_config_file(self) -> Path:
        return self.model_dir / ADAPTER_CONFIG_FILE

    @property
    def data_manifest_file(self) -> Path:
        return self.model_dir / DATA_MANIFEST_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def hydra_dir(self) -> Path:
        return self.root / ".hydra"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_tag(step)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
        return sorted(found, key=checkpoint_step)

    def newest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None
