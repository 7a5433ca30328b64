"""Export for inference: a training run's checkpoint, or an in-memory model, to a Hugging Face directory.

Modes:
    full          full fine-tuning: the model's weights
    merge         LoRA: base + adapter merged (peft's `merge_and_unload`) into plain Ouro weights
    adapter_only  LoRA: a standard peft adapter directory for `PeftModel.from_pretrained(base, dir)`
The default is `merge` for a LoRA run or `PeftModel`, `full` otherwise.

The model is rebuilt on the meta device and the (fp32) state dict assigned to it, so nothing is
initialised twice; LoRA merges happen in fp32 before the cast to the export dtype.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ouro_train.export.checkpoints import ExportError, TrainingRun, check_complete, consolidated_state_dict
from ouro_train.export.hf_dir import (
    DEFAULT_MAX_SHARD_SIZE,
    set_file_modes,
    torch_dtype,
    write_config,
    write_tokenizer,
    write_weights,
)
from ouro_train.export.model_card import CardFacts, run_facts, write_model_card
from ouro_train.model import OuroConfig, OuroForCausalLM
from ouro_train.run_dir import trainer_state_file

MODES = ("full", "merge", "adapter_only")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    mode: str | None = None,
    dtype: str = "auto",
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    remote_code_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export `checkpoint` (default: the run's newest complete one) of the training run at `run_dir`.
    `dtype` bf16, fp32, or auto: the run's `export.dtype`, whose own auto is the precision it trained in."""
    run = TrainingRun.open(run_dir)
    mode = _resolve_mode(mode, run.lora_config is not None, f"run {run.root}",
                         f"{run.layout.adapter_config_file} not found")
    _check_adapter_base(mode, run.base_model_path)
    out_dir = _check_out_dir(out_dir, overwrite)
    checkpoint = Path(checkpoint) if checkpoint is not None else run.newest_checkpoint()
    check_complete(checkpoint)
    dtype = _run_dtype(checkpoint) if dtype == "auto" else dtype
    model = _skeleton(run.config, run.lora_config)
    state = consolidated_state_dict(checkpoint, model.state_dict().keys())
    _assign(model, state, f"checkpoint {checkpoint}")
    facts = CardFacts(mode, dtype, run.config.total_ut_steps, remote_code_dir is not None, run.base_model_path,
                      random_init=run.lora_config is not None and run.base_model_path is None)
    _write(model, mode, out_dir, run.tokenizer(), dtype, max_shard_size, remote_code_dir, run.base_model_path,
           run_facts(run.root, checkpoint, facts))
    return out_dir


def serving_note(run_dir: str | Path, out_dir: str | Path, remote_code_dir: str | Path | None) -> str:
    """Where an export of a run loads, and, without remote code, the command that makes it load everywhere."""
    if remote_code_dir is not None:
        return "loads in ouro-train, upstream's remote code and vLLM (--trust-remote-code)"
    return ("loads in ouro-train; vLLM and upstream's remote code also need upstream's "
            f"configuration_ouro.py and modeling_ouro.py: ouro-export --run {run_dir} --out {out_dir} --overwrite "
            f"--remote-code DIR (DIR: a downloaded upstream checkpoint such as ByteDance/Ouro-1.4B), or train "
            f"with export.remote_code=DIR")


def _run_dtype(checkpoint: Path) -> str:
    """The export dtype a run asked for (`export.dtype`), else the precision it trained in, as its
    checkpoint's trainer_state.json records them (bf16 for runs that recorded neither)."""
    state = json.loads(trainer_state_file(checkpoint).read_text())
    asked = state.get("config", {}).get("export", {}).get("dtype", "auto")
    return asked if asked != "auto" else state.get("precision", "bf16")


def export_model(
    model: OuroForCausalLM | PeftModel,
    out_dir: str | Path,
    tokenizer,
    *,
    dtype: str = "bf16",
    mode: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    remote_code_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export an in-memory model; it is copied, never modified.

    Call it on one rank with the full weights present: under ZeRO-3, inside
    `deepspeed.zero.GatheredParameters(model.parameters())`.
    """
    lora_config = None
    base = model
    if isinstance(model, PeftModel):
        if model.active_adapter != "default" or set(model.peft_config) != {"default"}:
            raise ExportError(f"export needs one adapter named 'default', got {sorted(model.peft_config)}")
        lora_config = model.peft_config["default"]
        if not isinstance(lora_config, LoraConfig):
            raise ExportError(f"only LoRA adapters can be exported, got {type(lora_config).__name__}")
        base = model.get_base_model()
    if not isinstance(base, OuroForCausalLM):
        raise TypeError(f"expected an OuroForCausalLM or a PeftModel around one, got {type(base).__name__}")
    mode = _resolve_mode(mode, lora_config is not None, f"the {type(model).__name__}", "not a PeftModel")
    base_path = lora_config.base_model_name_or_path if lora_config is not None else None
    _check_adapter_base(mode, base_path)
    out_dir = _check_out_dir(out_dir, overwrite)

    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel() == 0:
            raise ExportError(f"{name} is empty: under ZeRO-3 gather the parameters before export_model "
                              f"(deepspeed.zero.GatheredParameters)")
        state[name] = tensor.detach().to("cpu", copy=True)
    rebuilt = _skeleton(base.config, lora_config)
    _assign(rebuilt, state, f"the {type(model).__name__}")
    facts = CardFacts(mode, dtype, base.config.total_ut_steps, remote_code_dir is not None,
                      base_path or base.config.name_or_path or None)
    _write(rebuilt, mode, out_dir, tokenizer, dtype, max_shard_size, remote_code_dir, base_path, facts)
    return out_dir


def _resolve_mode(mode: str | None, is_lora: bool, what: str, why_not_lora: str) -> str:
    if mode is None:
        return "merge" if is_lora else "full"
    if mode not in MODES:
        raise ExportError(f"export mode {mode!r} not in {MODES}")
    if is_lora and mode == "full":
        raise ExportError(f"{what} is a LoRA run: export it with mode 'merge' or 'adapter_only'")
    if not is_lora and mode != "full":
        raise ExportError(f"mode {mode!r} needs a LoRA run, but {what} has no LoRA adapter ({why_not_lora})")
    return mode


def _check_adapter_base(mode: str, base_path: str | None) -> None:
    if mode == "adapter_only" and not base_path:
        raise ExportError("an adapter-only export needs the base model it adapts, and this LoRA model started "
                          "from random weights (no base model path): export it merged instead")


def _check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (overwrite=True, or --overwrite, replaces it)")
    return out_dir


def _skeleton(config: OuroConfig, lora_config: LoraConfig | None) -> OuroForCausalLM | PeftModel:
    with torch.device("meta"):
        model = OuroForCausalLM(config)
        if lora_config is not None:
            model = get_peft_model(model, copy.deepcopy(lora_config))
    return model.eval()


def _assign(model, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ExportError(f"{source} does not match the model's config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    model.load_state_dict(state, strict=True, assign=True)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.tie_weights()  # assigning replaced the shared head with a copy


@torch.no_grad()
def _write(model, mode: str, out_dir: Path, tokenizer, dtype: str, max_shard_size, remote_code_dir, base_path,
           card: CardFacts) -> None:
    """Everything goes to a staging directory beside `out_dir`, renamed into place once complete."""
    target_dtype = torch_dtype(dtype)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if mode == "adapter_only":
            model.peft_config["default"].base_model_name_or_path = base_path
            model.to(target_dtype).save_pretrained(staging)
            config = model.get_base_model().config
        else:
            merged = model.merge_and_unload() if mode == "merge" else model
            weights = {k: v.to(target_dtype) for k, v in merged.state_dict().items()}
            config = merged.config
            write_weights(staging, weights, config, max_shard_size)
            write_config(staging, config, target_dtype, Path(remote_code_dir) if remote_code_dir else None)
        write_tokenizer(staging, tokenizer, config.vocab_size)
        write_model_card(staging, card)
        set_file_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
