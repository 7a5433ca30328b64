"""The run configuration: Hydra structured dataclasses, registered in Hydra's ConfigStore.

A recipe in `recipes/` starts from the schema and fills it in:

    defaults:
      - run_schema        # RunConfig below
      - data: sample_mix  # recipes/data/sample_mix.yaml merged into `data`
      - _self_

Because every section is a dataclass, a key the schema does not declare (a typo in a recipe or on the
command line) fails with "Key 'foo' is not in struct", and a wrongly typed value fails before any work
starts. Later sections (deepspeed, optim, objective, lora, checkpoint, ...) are added as new dataclass
fields of `RunConfig`.

`${repo_root:}` resolves to the repository that holds `recipes/` and `data/`, so recipes can name the
committed sample files without depending on the current directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ouro_train.train.engine import DeepSpeedConfig, OptimConfig
from ouro_train.train.lora import LoraConfig
from ouro_train.train.metrics import WandbConfig
from ouro_train.train.objectives import ObjectiveConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class ModelInit(Enum):
    pretrained = "pretrained"  # load weights from model.path
    random = "random"  # build from model.path's config (or defaults) + config_overrides, random weights


class Format(Enum):
    auto = "auto"  # chosen from the columns: messages / conversations / instruction+output / prompt+response
    messages = "messages"  # {"messages": [{"role", "content", "reasoning"?}, ...]}
    sharegpt = "sharegpt"  # {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
    prompt_response = "prompt_response"  # {"prompt", "response", "reasoning"?, "system"?}
    alpaca = "alpaca"  # {"instruction", "input"?, "output", "system"?}


class OnBadRow(Enum):
    error = "error"  # stop, naming the first bad row (source, file:line or row, field)
    skip = "skip"  # drop bad rows (counted by reason, logged in bad_rows.jsonl) within data.max_bad_fraction


class Overlong(Enum):
    drop = "drop"  # a conversation longer than max_seq_len is dropped
    truncate = "truncate"  # cut at max_seq_len; dropped if no supervised token is left


@dataclass
class ModelConfig:
    path: Optional[str] = None  # a checkpoint directory or hub id
    init: ModelInit = ModelInit.pretrained
    # Tokenizer directory; None: model.path when set, else the project tokenizer built from data/.
    tokenizer: Optional[str] = None
    # Config fields set over model.path's config (or the class defaults), e.g. a tiny model for CI.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing: none | layer | step | step+layer (step+layer for long sequences).
    checkpointing: str = "none"
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention (packed rows use flex on CUDA anyway)


@dataclass
class SourceConfig:
    """One data source: local files or a hub dataset, its format, and how much of it enters the mix."""

    name: str = MISSING
    domain: str = "general"
    format: Format = Format.auto
    path: Optional[str] = None  # a local .jsonl/.json/.parquet file or a glob of them
    # A hub dataset id (or a `datasets` builder such as json/parquet), loaded with
    # load_dataset(hf_id, hf_name, split=split, data_files=data_files, revision=revision, streaming=streaming).
    hf_id: Optional[str] = None
    hf_name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None  # a commit, tag or branch: pin it for a reproducible cache key
    # Files of the hub dataset to load (globs inside the repository), e.g. [SFT/code/*.jsonl]: only those are
    # downloaded; [] loads what hf_name/split select. With data_files the split is usually `train`.
    data_files: List[str] = field(default_factory=list)
    # Validate and count the hub rows as they stream in, keeping only the checked conversations on disk
    # (not a full Arrow copy of the raw dataset).
    streaming: bool = False
    # Keep only rows whose columns equal these values, or one of a list of values (e.g. {domain: math},
    # {domain: [math, science]}), applied before mixing. Sources reading the same data share one scan.
    where: Dict[str, Any] = field(default_factory=dict)
    # Column names where they differ from the format's defaults, e.g. {prompt: input, response: output};
    # null for an optional column to ignore (e.g. {reasoning: null} where `reasoning` means something else).
    fields: Dict[str, Optional[str]] = field(default_factory=dict)
    # Role (or sharegpt `from`) names -> system/user/assistant/tool, over the built-in names,
    # e.g. {function_call: assistant, observation: tool}.
    role_map: Dict[str, str] = field(default_factory=dict)
    # A system turn put first where a conversation has none (None: the chat template's default).
    system_prompt: Optional[str] = None
    # Split an assistant content that starts with "<think>...</think>" into reasoning + answer.
    parse_think: bool = True
    # How many rows enter the mix: at most one of weight / count / epochs (none: epochs=1).
    weight: Optional[float] = None  # share of data.mix_size among the weighted sources
    count: Optional[int] = None  # absolute number of rows
    epochs: Optional[float] = None  # multiple of the source's valid rows
    replace: bool = False  # draw with replacement instead of whole passes + a without-replacement rest
    max_bad_fraction: Optional[float] = None  # this source's bad-row budget (None: data.max_bad_fraction)


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    eval_sources: List[SourceConfig] = field(default_factory=list)
    # Convenience: each file becomes a source (name = file stem, format auto, epochs 1), added to the lists.
    train_files: List[str] = field(default_factory=list)
    eval_files: List[str] = field(default_factory=list)
    max_seq_len: int = 32768
    pack: bool = True  # best-fit pack conversations into rows of max_seq_len; else one per row
    on_bad_row: OnBadRow = OnBadRow.error
    # Under on_bad_row=skip: the share of a source's rows that may be bad before the run stops.
    max_bad_fraction: float = 0.001
    # Keep assistant replies that are only a <think> block (empty answer); else such a row is bad.
    allow_empty_answer: bool = False
    overlong: Overlong = Overlong.drop
    last_turn_only: bool = False  # supervise only the final assistant turn
    mix_size: Optional[int] = None  # rows shared by weighted sources (None: their total size)
    seed: int = 0
    num_proc: int = 1
    cache_dir: str = ".cache/ouro-train"


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # sequences per rank per forward
    # Sequences (or tokens: packed rows of data.max_seq_len) per optimizer step over all ranks; gradient
    # accumulation makes up the difference. Neither set: one micro-batch per rank per step.
    global_batch_size: Optional[int] = None
    global_batch_tokens: Optional[int] = None
    epochs: float = 1.0  # passes over the prepared training rows (max_steps wins when set)
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    keep_last: int = 2  # complete checkpoints kept (0: keep all)


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0: only at the end (when eval data is configured)
    max_batches: Optional[int] = None  # micro-batches per rank; None: the whole eval set
    ut_steps: List[int] = field(default_factory=list)  # recurrent steps scored (may exceed T); []: 1..T


@dataclass
class ComputePlanConfig:
    """`dry_run=true`: the compute plan of a recipe for a cluster, without loading weights."""

    gpus: int = 8
    # Training tokens per second per GPU. Default: our measured Ouro-1.4B full fine-tuning figure on one
    # H100 80GB at 4K tokens (upstream-style step: per-layer checkpointing, SDPA, bf16; 2026-11-23).
    tok_per_s_per_gpu: float = 4095.0
    # Mean tokens per example, used where the data is not local (hub sources of the thinking mix).
    tokens_per_example: float = 4000.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plan: ComputePlanConfig = field(default_factory=ComputePlanConfig)
    seed: int = 0
    output_dir: str = "outputs/run"
    max_steps: Optional[int] = None  # optimizer steps; None: train.epochs over the data
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | none | a checkpoint directory
    export_at_end: bool = True  # an inference export in output_dir/export after the last step
    dry_run: bool = False  # print the compute plan and exit


if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_object(cfg: Any) -> RunConfig:
    """A resolved RunConfig (real dataclasses and enums) from Hydra's DictConfig.

    Hydra's `+key=value` adds a key even to a dataclass node; such a key is refused here."""
    run = OmegaConf.to_object(cfg)
    _reject_unknown_keys(run, "")
    return run


def _reject_unknown_keys(node: Any, path: str) -> None:
    if dataclasses.is_dataclass(node):
        known = {f.name for f in dataclasses.fields(node)}
        unknown = sorted(set(vars(node)) - known)
        if unknown:
            raise ValueError(f"unknown config key {path}{unknown[0]} (not a field of {type(node).__name__})")
        for name in known:
            _reject_unknown_keys(getattr(node, name), f"{path}{name}.")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _reject_unknown_keys(item, f"{path}{i}.")


def to_plain_dict(run: RunConfig) -> dict:
    """The resolved config as JSON-ready builtins (enums as their names), for logs and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True)
