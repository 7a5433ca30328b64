"""Tokenizers: loading the one a run uses, and building the project's own small tokenizer.

The project tokenizer stands in for Ouro's where no checkpoint is at hand (CI, smoke runs, tiny random
models). It is built like Ouro's (SmolLM2's): byte-level BPE, digits split one by one, no normalizer,
no BOS added, the same 17 special tokens at ids 0..16 and the same chat template, but with a vocabulary
of `PROJECT_VOCAB_SIZE` learnt from the committed samples in `data/samples/`. Training is deterministic;
the result is cached under `{cache_dir}/tokenizer-{hash of the samples and settings}/`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ouro_train.config import REPO_ROOT, ModelConfig, SourceConfig
from ouro_train.data.cache import atomic_dir
from ouro_train.data.chat import DEFAULT_SYSTEM
from ouro_train.data.formats import detect_format, to_conversation

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]  # fmt: skip
# Ouro-1.4B's chat template (tokenizer_config.json), verbatim.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}{%- for message in messages -%}{%- if message.role == 'system' and loop.first -%}{# Skip #}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"
)
PROJECT_VOCAB_SIZE = 1024
SAMPLES_DIR = REPO_ROOT / "data" / "samples"
BUILD_VERSION = 1  # bump when the build below changes what it produces


def load_tokenizer(model: ModelConfig, cache_dir: str) -> PreTrainedTokenizerFast:
    """model.tokenizer, else model.path's tokenizer, else the project tokenizer."""
    source = model.tokenizer or model.path
    if source is None:
        return project_tokenizer(cache_dir)
    return PreTrainedTokenizerFast.from_pretrained(source)


def tokenizer_hash(tokenizer) -> str:
    """What a prepared cache depends on: the vocabulary, merges, pre-tokenizer... and the chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def project_tokenizer(cache_dir: str, samples_dir: Path = SAMPLES_DIR) -> PreTrainedTokenizerFast:
    """The project tokenizer, built from `samples_dir` on first use and cached under `cache_dir`."""
    files = sample_files(samples_dir)
    h = hashlib.sha256(json.dumps([BUILD_VERSION, PROJECT_VOCAB_SIZE, SPECIAL_TOKENS, CHAT_TEMPLATE]).encode())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    target = Path(cache_dir) / f"tokenizer-{h.hexdigest()[:16]}"
    if not target.exists():
        with atomic_dir(target) as tmp:
            build_project_tokenizer(files).save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(target)


def build_project_tokenizer(files: list[Path], vocab_size: int = PROJECT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(files), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[0],
        additional_special_tokens=SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def sample_files(samples_dir: Path = SAMPLES_DIR) -> list[Path]:
    files = sorted(p for p in samples_dir.glob("*") if p.suffix in (".jsonl", ".parquet"))
    if not files:
        raise FileNotFoundError(f"no sample data in {samples_dir} to build the project tokenizer from")
    return files


def _training_texts(files: list[Path]) -> Iterator[str]:
    """Every message of every sample conversation, as the chat format writes it (without specials)."""
    for path in files:
        rows = pq.read_table(path).to_pylist() if path.suffix == ".parquet" else _jsonl(path)
        for row in rows:
            messages = to_conversation(row, detect_format(row.keys(), path.stem), SourceConfig(name=path.stem))
            if messages[0]["role"] != "system":
                yield f"system\n{DEFAULT_SYSTEM}"
            for m in messages:
                yield f"{m['role']}\n{m['content']}"
                if m["reasoning"] is not None:
                    yield f"\n{m['reasoning']}\n"


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())

