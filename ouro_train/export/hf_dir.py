"""Writing a Hugging Face model directory in upstream Ouro's layout.

    model.safetensors                     (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    config.json                           model_type ouro, architectures [OuroForCausalLM], dtype, ...
    generation_config.json                the model card's sampling; eos [<|im_end|>, <|endoftext|>], pad <|endoftext|>
    tokenizer.json, tokenizer_config.json, chat_template.jinja

Weights are written with safetensors from the state dict (never a pickle), with upstream key names; a
tied `lm_head` is stored once, as `model.embed_tokens.weight` (upstream's `save_pretrained` layout).
Every file gets the mode the umask gives a new file (safetensors itself writes 0600).
The tokenizer files are written in the form transformers 4.44+ and 5.x both read.
With `remote_code_dir` (a downloaded upstream checkpoint holding `configuration_ouro.py` and
`modeling_ouro.py`), those files are copied and `auto_map` points at them, for
`trust_remote_code=True` loaders and vLLM, whose `ouro` model needs upstream's config class.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ouro_train.export.checkpoints import ExportError
from ouro_train.generation.chat import CARD_SAMPLING, DTYPES, stop_token_ids
from ouro_train.model import OuroConfig

DEFAULT_MAX_SHARD_SIZE = "5GB"
REMOTE_CODE_FILES = ("configuration_ouro.py", "modeling_ouro.py")
TIED_HEAD = "lm_head.weight"
# Written by transformers 5.x, unknown to 4.x: the class every version has, and the key both read.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Where the tokenizer was loaded from, not what it is: never worth carrying into an export.
LOAD_TIME_KEYS = ("is_local", "local_files_only")
AUTO_MAP = {
    "AutoConfig": "configuration_ouro.OuroConfig",
    "AutoModel": "modeling_ouro.OuroModel",
    "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
}


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
    return DTYPES[dtype]


def write_weights(out_dir: Path, state_dict: dict[str, torch.Tensor], config: OuroConfig,
                  max_shard_size: int | str) -> None:
    """safetensors file(s), with an index when sharded."""
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != TIED_HEAD}
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n].contiguous() for n in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_remote_code(remote_code_dir: Path, option: str) -> None:
    for name in REMOTE_CODE_FILES:
        if not (remote_code_dir / name).is_file():
            needed = " and ".join(REMOTE_CODE_FILES)
            raise ExportError(f"{remote_code_dir / name} not found: {option} needs upstream's {needed}")


def write_config(out_dir: Path, config: OuroConfig, dtype: torch.dtype, remote_code_dir: Path | None) -> None:
    config = copy.deepcopy(config)
    config.architectures = ["OuroForCausalLM"]
    config.dtype = dtype
    if hasattr(config, "auto_map"):  # only valid beside the remote-code files it names
        del config.auto_map
    if remote_code_dir is not None:
        check_remote_code(remote_code_dir, "--remote-code")
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(remote_code_dir / name, out_dir / name)
        config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(out_dir)


def write_tokenizer(out_dir: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer files (with the chat template) and a generation config that stops at the end of a
    chat turn as well as at the end of a document."""
    if tokenizer.chat_template is None:
        raise ExportError("the tokenizer has no chat template")
    if len(tokenizer) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")
    tokenizer.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir / "tokenizer_config.json", tokenizer.chat_template)
    im_end, end_of_text = stop_token_ids(tokenizer)
    GenerationConfig(**CARD_SAMPLING, eos_token_id=[im_end, end_of_text],
                     pad_token_id=end_of_text).save_pretrained(out_dir)


def _make_tokenizer_config_portable(path: Path, chat_template: str) -> None:
    """transformers 5.x names its fast tokenizer `TokenizersBackend` and lists the additional special
    tokens under `extra_special_tokens`; 4.x knows neither (it expects a dict of named tokens there).
    Both versions read `PreTrainedTokenizerFast` with `additional_special_tokens`, and 4.x before 4.50
    reads the chat template only from this file."""
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = extra
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def set_file_modes(out_dir: Path) -> None:
    """The mode the umask gives a new file, for every file: safetensors (ours and peft's) writes 0600,
    which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():
        os.chmod(path, 0o666 & ~umask)
