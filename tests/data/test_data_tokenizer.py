"""The project tokenizer: built like Ouro's, deterministic, cached, loadable with its chat template."""

import json

from data_helpers import ouro_tok, project_tok
from transformers import AutoTokenizer

from ouro_train.config import ModelConfig
from ouro_train.data import tokenizer as tokenizer_module
from ouro_train.data.tokenizer import (
    CHAT_TEMPLATE,
    PROJECT_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_project_tokenizer,
    load_tokenizer,
    project_tokenizer,
    sample_files,
    tokenizer_hash,
)


def test_build_is_deterministic():
    a = build_project_tokenizer(sample_files())
    b = build_project_tokenizer(sample_files())
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert tokenizer_hash(a) == tokenizer_hash(project_tok())


def test_shape_like_ouro():
    tok = project_tok()
    assert len(tok) == PROJECT_VOCAB_SIZE
    assert [tok.convert_ids_to_tokens(i) for i in range(17)] == SPECIAL_TOKENS
    assert tok.encode("2025 has 365 days", add_special_tokens=True)[:4] == tok.convert_tokens_to_ids(["2", "0", "2", "5"])
    assert tok.encode("hello")[0] != 0  # no BOS
    assert tok.decode(tok.encode("Ünïcode & code: x = [1, 2]\n\ttab")) == "Ünïcode & code: x = [1, 2]\n\ttab"
    assert tok.chat_template == CHAT_TEMPLATE


def test_same_specials_template_and_pipeline_as_the_real_tokenizer():
    real, ours = ouro_tok(), project_tok()
    assert real.chat_template == CHAT_TEMPLATE
    assert [real.convert_ids_to_tokens(i) for i in range(17)] == SPECIAL_TOKENS
    spec = {k: json.loads(t.backend_tokenizer.to_str()) for k, t in (("real", real), ("ours", ours))}
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert spec["ours"][part] == spec["real"][part], part
    assert [t["content"] for t in spec["ours"]["added_tokens"]] == [t["content"] for t in spec["real"]["added_tokens"]]


def test_cached_build_and_loading(tmp_path, monkeypatch):
    first = project_tokenizer(str(tmp_path))
    (built,) = tmp_path.glob("tokenizer-*")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached tokenizer")

    monkeypatch.setattr(tokenizer_module, "build_project_tokenizer", no_rebuild)
    again = load_tokenizer(ModelConfig(), str(tmp_path))  # no path, no tokenizer: the project one
    assert tokenizer_hash(again) == tokenizer_hash(first)
    auto = AutoTokenizer.from_pretrained(built)
    assert auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    assert tokenizer_hash(load_tokenizer(ModelConfig(tokenizer=str(built)), "unused")) == tokenizer_hash(first)
