"""The run configuration: Hydra structured dataclasses, registered in Hydra's ConfigStore.

A recipe in `recipes/` starts from the schema and fills it in:

    defaults:
      - run_schema        # RunConfig below
      - data: sample_mix  # recipes/data/sample_mix.yaml merged into `data`
      - _self_

Because every section is a dataclass, a key the schema does not declare (a typo in a recipe or on the
command line) fails with "Key 'foo' is not in struct", and a wrongly typed value fails before any work
starts: choice fields are Enums, so `objective.name=expected_logit` fails while Hydra composes the config.
Value checks (ranges, combinations) run in `to_object`, before any process group, data or weights, and
name the field by its dotted path (`optim.lr: must be > 0, got 0.0`).

This module is the bottom of the package: it imports nothing from `model/`, `data/` or `train/`.

`${repo_root:}` resolves to the repository that holds `recipes/` and `data/`, so recipes can name the
committed sample files without depending on the current directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field's dotted name."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


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


# Activation checkpointing policy (the model's `set_activation_checkpointing` argument, explained in
# ouro_train/model/checkpointing.py, which lists the same names): `layer` checkpoints each layer
# application, `step` each recurrent step, `step+layer` both; `:save_attn` / `:save_matmul` keep the
# attention / every matmul output of a layer checkpoint and recompute the rest; `layer/k` checkpoints one
# layer application in k. `auto` is resolved before the model is built to the policy executing the
# fewest FLOPs whose estimated peak fits the GPU (train/memory.py). Functional form: the member names
# are the values Hydra reads from a recipe, and `step+layer` is no identifier.
Checkpointing = Enum("Checkpointing", {name: name for name in (
    "none", "layer/4", "layer/2", "layer:save_matmul", "layer:save_attn", "layer", "step",
    "step+layer:save_matmul", "step+layer:save_attn", "step+layer", "auto")})

# Released architectures the compute plan can size without a checkpoint (ouro_train.model.configuration).
ModelSize = Enum("ModelSize", {name: name for name in ("1.4b", "2.6b")})


class AttnImplementation(Enum):
    sdpa = "sdpa"
    eager = "eager"  # the reference
    flex_attention = "flex_attention"  # packed rows use it on CUDA anyway


class Objective(Enum):
    expected_logits = "expected_logits"  # upstream's loss: CE of the exit-pdf-weighted logits
    expected_loss = "expected_loss"  # the paper's: sum_t p_t CE_t - beta H(p)
    final_step = "final_step"  # CE of the last recurrent step only
    gate = "gate"  # stage-2 adaptive gate training, LM frozen


class Schedule(Enum):
    """The learning-rate schedule after the linear warm-up (engine.lr_lambda has the formulas)."""

    cosine = "cosine"  # cosine from lr to lr · min_lr_ratio
    linear = "linear"  # straight line from lr to lr · min_lr_ratio
    constant = "constant"  # lr throughout, no warm-up (warmup settings must be 0)
    constant_with_warmup = "constant_with_warmup"  # warm-up, then lr
    wsd = "wsd"  # warm-up, stable at lr, then the last decay_ratio of the steps linear to lr · min_lr_ratio


class ExportDtype(Enum):
    auto = "auto"  # the training dtype (bf16 when deepspeed trains in bf16, else fp32)
    bf16 = "bf16"
    fp32 = "fp32"


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    path: Optional[str] = None  # a checkpoint directory or hub id
    init: ModelInit = ModelInit.pretrained
    # Tokenizer directory; None: model.path when set, else the project tokenizer built from data/.
    tokenizer: Optional[str] = None
    # Config fields set over model.path's config (or the class defaults), e.g. a tiny model for CI.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing policy (see Checkpointing): none | layer | step+layer:save_attn | ... | auto.
    checkpointing: Checkpointing = Checkpointing["none"]
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    # torch.compile the decoder layer (one compiled region, run T × L times per forward): true | false |
    # auto (on for CUDA, where fusing the elementwise work pays; off on CPU, where compiling costs more
    # than it saves). Not under ZeRO-3 (RunConfig.compiles says why).
    compile: Union[bool, str] = "auto"

    def check(self, at: str) -> None:
        _require(self.compile in (True, False, "auto"), f"{at}.compile",
                 f"must be true, false or auto, got {self.compile!r}")


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
    # Also supervise the prompt: system, user and tool turns and the assistant headers.
    train_on_prompt: bool = False
    # true: the "\n" after an assistant's <|im_end|> is not supervised (generation stops at <|im_end|>);
    # false: it is, as LLaMA-Factory's ChatML template does (its reply slot is "{content}<|im_end|>\n").
    mask_turn_end: bool = True
    # false: the rows keep the order of the files (one document per row without packing, sources in
    # order, no mix draw) and the loader takes them in that order on every epoch.
    shuffle: bool = True
    # Hold out training conversations as the eval set: a fraction (< 1) or a count (>= 1) of the valid
    # training rows, drawn with data.seed; 0: none. Excludes data.eval_sources / eval_files / eval_datasets.
    val_size: float = 0.0
    # A LLaMA-Factory dataset_info.json, and the names of its entries to train (and evaluate) on.
    dataset_info: Optional[str] = None
    datasets: List[str] = field(default_factory=list)
    eval_datasets: List[str] = field(default_factory=list)
    mix_size: Optional[int] = None  # rows shared by weighted sources (None: their total size)
    seed: int = 0
    num_proc: int = 1
    cache_dir: str = ".cache/ouro-train"

    def check(self, at: str) -> None:
        # Sources are checked by the data pipeline, which names the source and its files.
        _require(self.max_seq_len >= 2, f"{at}.max_seq_len", f"must be >= 2, got {self.max_seq_len}")
        _require(self.num_proc >= 1, f"{at}.num_proc", f"must be >= 1, got {self.num_proc}")
        _require(self.mix_size is None or self.mix_size >= 0, f"{at}.mix_size", f"must be >= 0, got {self.mix_size}")
        _require(self.val_size >= 0 and (self.val_size < 1 or self.val_size == int(self.val_size)), f"{at}.val_size",
                 f"must be a fraction in [0, 1) or a whole count of rows, got {self.val_size}")
        _require(not (self.val_size and (self.eval_sources or self.eval_files or self.eval_datasets)), f"{at}.val_size",
                 f"holds out eval rows from the training data; set it or {at}.eval_sources/eval_files/eval_datasets, "
                 "not both")
        _require(self.dataset_info is not None or not (self.datasets or self.eval_datasets), f"{at}.datasets",
                 f"names entries of a dataset_info.json: set {at}.dataset_info=PATH")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # sequences per rank per forward
    # Sequences (or tokens: packed rows of data.max_seq_len) per optimizer step over all ranks; gradient
    # accumulation makes up the difference. Neither set: one micro-batch per rank per step.
    global_batch_size: Optional[int] = None
    global_batch_tokens: Optional[int] = None
    epochs: float = 1.0  # passes over the prepared training rows (max_steps wins when set)
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops
    # The loss of every recurrent step (`loss_step{t}`) is logged on steps 1, 1 + N, 1 + 2N, ...: each
    # step the objective does not use itself costs a vocabulary projection of every token. The other
    # steps log the loss and the exit statistics (free) and the per-step losses the objective computes.
    log_every: int = 1

    def check(self, at: str) -> None:
        _require(self.micro_batch_size >= 1, f"{at}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.global_batch_size is None or self.global_batch_tokens is None, f"{at}.global_batch_tokens",
                 f"set {at}.global_batch_size or {at}.global_batch_tokens, not both")
        for name in ("global_batch_size", "global_batch_tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{at}.{name}", f"must be >= 1, got {value}")
        _require(self.epochs > 0, f"{at}.epochs", f"must be > 0, got {self.epochs}")
        _require(self.max_bad_steps >= 1, f"{at}.max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        _require(self.log_every >= 1, f"{at}.log_every", f"must be >= 1, got {self.log_every}")


@dataclass
class ParallelConfig:
    """How ranks share the work beyond data parallelism."""

    # Ulysses sequence parallelism: this many ranks take the same packed row, S/N tokens each (all S
    # for H/N heads inside attention). Must divide the number of processes and the attention and KV
    # heads (checked at start-up, before data or weights), and data.max_seq_len. 1: off.
    sequence_parallel_size: int = 1

    def check(self, at: str) -> None:
        _require(self.sequence_parallel_size >= 1, f"{at}.sequence_parallel_size",
                 f"must be >= 1, got {self.sequence_parallel_size}")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only, never to norms, biases or the exit gate bias
    grad_clip: float = 1.0
    warmup_ratio: float = 0.0  # of the total optimizer steps; warmup_steps wins when set
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0  # the decaying schedules end at lr · min_lr_ratio
    schedule: Schedule = Schedule.cosine
    decay_ratio: float = 0.1  # wsd: the share of the total steps spent decaying, at the end

    def check(self, at: str) -> None:
        _require(self.lr > 0, f"{at}.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{at}.betas",
                 f"must be two values in [0, 1), got {list(self.betas)}")
        _require(self.eps > 0, f"{at}.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"{at}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"{at}.grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        _require(0 <= self.warmup_ratio <= 1, f"{at}.warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        _require(self.warmup_steps is None or self.warmup_steps >= 0, f"{at}.warmup_steps",
                 f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"{at}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.decay_ratio <= 1, f"{at}.decay_ratio", f"must be in (0, 1], got {self.decay_ratio}")
        warms = bool(self.warmup_steps) or (self.warmup_steps is None and self.warmup_ratio > 0)
        _require(not (self.schedule == Schedule.constant and warms), f"{at}.schedule",
                 f"constant has no warm-up; use constant_with_warmup or set {at}.warmup_ratio=0")


@dataclass
class DeepSpeedConfig:
    """Config group `deepspeed` (recipes/deepspeed/*.yaml)."""

    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states + step on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    bf16: Optional[bool] = None  # None: bf16 on CUDA, fp32 elsewhere
    overlap_comm: bool = True
    reduce_bucket_size: int = 200_000_000
    stage3_param_persistence_threshold: int = 100_000  # 0 in tests: tiny models would never be partitioned
    extra: Dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys merged last

    def check(self, at: str) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"{at}.zero_stage", f"must be 0..3, got {self.zero_stage}")
        _require(not self.offload_params or self.zero_stage == 3, f"{at}.offload_params", "needs zero_stage 3")
        _require(not self.offload_optimizer or self.zero_stage >= 1, f"{at}.offload_optimizer",
                 "needs zero_stage >= 1")


@dataclass
class ObjectiveConfig:
    name: Objective = Objective.expected_logits
    entropy_beta: float = 0.05  # β of expected_loss (paper: 0.1 in stage 1a, 0.05 after)
    gate_k: float = 50.0  # slope k of the stage-2 target
    gate_gamma: float = 0.005  # improvement threshold γ of the stage-2 target
    loss_chunk_tokens: int = 4096  # tokens per vocabulary projection (fp32 logits: chunk × vocab × 4 B)

    def check(self, at: str) -> None:
        _require(self.loss_chunk_tokens >= 1, f"{at}.loss_chunk_tokens", f"must be >= 1, got {self.loss_chunk_tokens}")
        _require(self.entropy_beta >= 0, f"{at}.entropy_beta", f"must be >= 0, got {self.entropy_beta}")


# The linear projections of an Ouro decoder layer: what LoRA adapters can target.
OURO_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the head (the exit gate is excluded)


class LoraInit(Enum):
    default = "default"  # A Kaiming-uniform, B zero: training starts from the base model
    gaussian = "gaussian"  # A Gaussian (scaled by 1/r), B zero
    pissa = "pissa"  # A, B from the top-r singular vectors of W; the base keeps the rest (W - BA)
    olora = "olora"  # A, B from a QR decomposition of W; the base keeps the rest


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # A list of Ouro projections, or the string "all-linear" (all seven). `Any`: Hydra takes a string
    # for no list field; `check` validates both forms.
    target_modules: Any = field(default_factory=lambda: list(OURO_LINEAR_MODULES))
    # Whole modules trained (and saved) beside the adapters, e.g. ["early_exit_gate"] or norms
    # ["input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2", "norm"].
    modules_to_save: List[str] = field(default_factory=list)
    use_dora: bool = False  # DoRA: a learnt magnitude per output feature, LoRA on the direction
    use_rslora: bool = False  # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r
    init: LoraInit = LoraInit.default
    # LoRA+: the B matrices (and trained vectors, as peft's LoRA+ does) learn at optim.lr × this ratio.
    loraplus_lr_ratio: Optional[float] = None

    def check(self, at: str) -> None:
        _require(self.r >= 1, f"{at}.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, f"{at}.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"{at}.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if targets != ALL_LINEAR:
            is_list = isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
            _require(is_list, f"{at}.target_modules", f"must be {ALL_LINEAR!r} or a list of {OURO_LINEAR_MODULES}, "
                     f"got {targets!r}")
            unknown = sorted(set(targets) - set(OURO_LINEAR_MODULES))
            _require(not unknown, f"{at}.target_modules",
                     f"{unknown} are not Ouro projections; choose from {OURO_LINEAR_MODULES}")
        ratio = self.loraplus_lr_ratio
        _require(ratio is None or ratio > 0, f"{at}.loraplus_lr_ratio", f"must be > 0, got {ratio}")
        _require(ratio is None or self.enabled, f"{at}.loraplus_lr_ratio", f"needs {at}.enabled=true")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    # Also save once this many minutes of wall clock passed since the last save (preemptible queues);
    # None: steps only. The ranks decide together (any rank's clock past it), so all save the same step.
    every_n_minutes: Optional[float] = None
    keep_last: int = 2  # complete checkpoints kept (0: keep all)

    def check(self, at: str) -> None:
        _require(self.every_n_steps >= 1, f"{at}.every_n_steps", f"must be >= 1, got {self.every_n_steps}")
        _require(self.every_n_minutes is None or self.every_n_minutes > 0, f"{at}.every_n_minutes",
                 f"must be > 0 (null: steps only), got {self.every_n_minutes}")
        _require(self.keep_last >= 0, f"{at}.keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0: only at the end (when eval data is configured)
    max_batches: Optional[int] = None  # micro-batches per rank; None: the whole eval set
    ut_steps: List[int] = field(default_factory=list)  # recurrent steps scored (may exceed T); []: 1..T
    # A small generation benchmark at every evaluation (`ouro-eval --benchmark` names, e.g. math500): pass@1
    # of one completion (temperature 1.0, top-p 0.7) for each of its first `benchmark_samples` problems.
    benchmark: Optional[str] = None
    benchmark_data: Optional[str] = None  # a local file or HUB_ID[:SUBSET][@SPLIT]; None: the benchmark's default
    benchmark_samples: int = 32
    benchmark_max_new_tokens: int = 1024

    def check(self, at: str) -> None:
        _require(self.every_n_steps >= 0, f"{at}.every_n_steps", f"must be >= 0, got {self.every_n_steps}")
        _require(self.max_batches is None or self.max_batches >= 1, f"{at}.max_batches",
                 f"must be >= 1, got {self.max_batches}")
        _require(all(t >= 1 for t in self.ut_steps), f"{at}.ut_steps", f"must be >= 1, got {list(self.ut_steps)}")
        for name in ("benchmark_samples", "benchmark_max_new_tokens"):
            _require(getattr(self, name) >= 1, f"{at}.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "ouro-train"
    name: Optional[str] = None  # run name; default: the output directory's name
    entity: Optional[str] = None


@dataclass
class ComputePlanConfig:
    """`dry_run=true`: the compute plan of a recipe for a cluster, without loading weights."""

    gpus: int = 8
    # Model whose memory and FLOPs are planned; None: model.path's config.json, else Ouro-1.4B
    # (model.config_overrides apply on top either way).
    model_size: Optional[ModelSize] = None
    # GPU memory the plan must fit in (the longest max_seq_len and checkpointing=auto are sized to it).
    gpu_memory_gib: float = 80.0
    # GPU whose dense bf16 peak FLOP/s (ouro_train.model.flops) the time estimate uses.
    gpu: str = "H100"
    # Model FLOPs utilization; None: the last measurement recorded in bench/results/.
    mfu: Optional[float] = None
    # Training tokens per second per GPU; None: from FLOPs per token (recomputation included), the
    # GPU's peak and the MFU.
    tok_per_s_per_gpu: Optional[float] = None
    # Mean tokens per example, used where the data is not local (hub sources of the thinking mix).
    tokens_per_example: float = 4000.0
    # Trace one step per checkpointing policy (about a minute each for a 1.4B model on a CPU).
    estimate_memory: bool = True

    def check(self, at: str) -> None:
        _require(self.gpus >= 1, f"{at}.gpus", f"must be >= 1, got {self.gpus}")
        _require(self.gpu_memory_gib > 0, f"{at}.gpu_memory_gib", f"must be > 0, got {self.gpu_memory_gib}")
        _require(self.mfu is None or 0 < self.mfu <= 1, f"{at}.mfu", f"must be in (0, 1], got {self.mfu}")
        _require(self.tok_per_s_per_gpu is None or self.tok_per_s_per_gpu > 0, f"{at}.tok_per_s_per_gpu",
                 f"must be > 0, got {self.tok_per_s_per_gpu}")
        _require(self.tokens_per_example > 0, f"{at}.tokens_per_example", f"must be > 0, got {self.tokens_per_example}")


@dataclass
class ExportConfig:
    """The export the run writes to output_dir/export at the end (export_at_end)."""

    # A downloaded upstream Ouro checkpoint (e.g. ByteDance/Ouro-1.4B): its configuration_ouro.py and
    # modeling_ouro.py are copied and auto_map points at them, as vLLM and upstream's loaders need.
    remote_code: Optional[str] = None
    dtype: ExportDtype = ExportDtype.auto  # auto: the dtype the run trained in


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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
    # Settings (dotted keys or whole sections, e.g. [optim.lr, data]) a resume may change although they
    # define the trajectory; the change and its step are recorded in trainer_state.json and the model card.
    resume_allow_changes: List[str] = field(default_factory=list)
    export_at_end: bool = True  # an inference export in output_dir/export after the last step
    export: ExportConfig = field(default_factory=ExportConfig)
    dry_run: bool = False  # print the compute plan and exit

    def check(self, at: str = "") -> None:
        """Checks that span sections (each section checks its own fields)."""
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(not (self.objective.name == Objective.gate and self.lora.enabled), "objective.name",
                 "gate trains the exit gate alone; it cannot be combined with lora.enabled=true")
        sp = self.parallel.sequence_parallel_size
        _require(sp < 1 or self.data.max_seq_len % sp == 0, "parallel.sequence_parallel_size",
                 f"data.max_seq_len={self.data.max_seq_len} does not split into {sp} equal shards "
                 f"(choose a max_seq_len that is a multiple of {sp})")
        _require(not (self.model.compile is True and self.deepspeed.zero_stage == 3), "model.compile",
                 f"true does not work with deepspeed.zero_stage=3: {ZERO3_COMPILE}; use zero_stage 2 or model.compile=false")
        tokens = self.train.global_batch_tokens
        _require(tokens is None or tokens % self.data.max_seq_len == 0, "train.global_batch_tokens",
                 f"{tokens} is not a multiple of data.max_seq_len={self.data.max_seq_len} (the length of a packed row)")

    def compiles(self, device_type: str) -> bool:
        """`model.compile` resolved for the device the run trains on (`auto`: CUDA without ZeRO-3)."""
        if self.model.compile == "auto":
            return device_type == "cuda" and self.deepspeed.zero_stage != 3
        return self.model.compile


# Why model.compile and ZeRO-3 are not combined (refused when asked for, `auto` leaves compile off).
ZERO3_COMPILE = ("ZeRO-3 gathers and releases each projection's weights in module hooks inside the compiled "
                 "layer, which break its graph at every projection")

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_object(cfg: Any) -> RunConfig:
    """A resolved RunConfig (real dataclasses and enums) from Hydra's DictConfig.

    Hydra's `+key=value` adds a key even to a dataclass node; such a key is refused here. Then every
    section's `check` runs: a bad value fails now, naming its field."""
    run = OmegaConf.to_object(cfg)
    _reject_unknown_keys(run, "")
    _check(run, "")
    _check_against_model_config(run)
    return run


def _check_against_model_config(run: RunConfig) -> None:
    """What `model.path`'s config.json (a local checkpoint) says against the run: a depth override keeps
    `layer_types` one entry per layer (extended or cut when the checkpoint's layers are all of one kind,
    as Ouro's are; refused otherwise), and `data.max_seq_len` must fit the model's positions."""
    overrides = run.model.config_overrides
    file = Path(run.model.path, "config.json") if run.model.path else None
    base = json.loads(file.read_text()) if file is not None and file.is_file() else {}
    layers = overrides.get("num_hidden_layers")
    types = base.get("layer_types")
    if layers is not None and "layer_types" not in overrides and types and len(types) != layers:
        _require(isinstance(layers, int) and layers >= 1, "model.config_overrides.num_hidden_layers",
                 f"must be an integer >= 1, got {layers!r}")
        _require(len(set(types)) == 1, "model.config_overrides.num_hidden_layers",
                 f"{layers} layers, but {file} lists {len(types)} layer_types of several kinds; set "
                 f"model.config_overrides.layer_types to a list of {layers} entries too")
        overrides["layer_types"] = [types[0]] * layers
    positions = overrides.get("max_position_embeddings", base.get("max_position_embeddings"))
    where = ("model.config_overrides.max_position_embeddings" if "max_position_embeddings" in overrides
             else f"{file}")
    _require(positions is None or run.data.max_seq_len <= positions, "data.max_seq_len",
             f"{run.data.max_seq_len} exceeds the model's max_position_embeddings {positions} ({where}); lower "
             "data.max_seq_len, or raise model.config_overrides.max_position_embeddings if the model should "
             "go beyond the positions it was trained on")


def _check(node: Any, path: str) -> None:
    if dataclasses.is_dataclass(node):
        if hasattr(node, "check"):
            node.check(path.rstrip("."))
        for f in dataclasses.fields(node):
            _check(getattr(node, f.name), f"{path}{f.name}.")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check(item, f"{path}{i}.")


def _reject_unknown_keys(node: Any, path: str) -> None:
    if dataclasses.is_dataclass(node):
        known = {f.name for f in dataclasses.fields(node)}
        unknown = sorted(set(vars(node)) - known)
        if unknown:
            raise ConfigError(f"{path}{unknown[0]}: unknown config key (not a field of {type(node).__name__}; "
                              f"its fields: {', '.join(sorted(known))})")
        for name in known:
            _reject_unknown_keys(getattr(node, name), f"{path}{name}.")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _reject_unknown_keys(item, f"{path}{i}.")


def to_plain_dict(run: RunConfig) -> dict:
    """The resolved config as JSON-ready builtins (enums as their names), for logs and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True)
