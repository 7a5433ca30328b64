"""What other consumers of an export need: readable file modes, tied heads stored once, the model card's
sampling in generation_config.json, and tokenizer files that transformers 4.x reads too."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import assert_instances_agree, shared_path, tiny_model
from ouro_train.data import project_tokenizer
from ouro_train.export import export_model
from tf4_probe import MESSAGES

VOCAB = 49152


@pytest.fixture(scope="module")
def ouro_tokenizer():
    return AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))


@pytest.fixture(scope="module")
def tokenizer_of_the_project(tmp_path_factory):
    return project_tokenizer(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def test_every_file_gets_the_umask_mode(ouro_tokenizer, tmp_path, umask_027):
    model = tiny_model(seed=41, vocab_size=VOCAB)
    out = export_model(model, tmp_path / "export", ouro_tokenizer, max_shard_size="4MB")
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert modes == {name: 0o640 for name in modes}  # 0666 less the umask, as open() gives a new file


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tied_head_is_stored_once_and_reloads_tied(ouro_tokenizer, tmp_path, dtype):
    model = tiny_model(seed=42, vocab_size=VOCAB, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = export_model(model, tmp_path / "export", ouro_tokenizer, dtype=dtype)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert names == set(model.state_dict()) - {"lm_head.weight"}

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(3, VOCAB, (2, 9))
    if dtype == "fp32":
        assert_instances_agree(reloaded(ids).logits, model(ids).logits)
    else:  # the same head as the bf16 embedding, not a separately rounded copy
        torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight.bfloat16().float(), rtol=0, atol=0)


def test_generation_config_carries_the_card_sampling(ouro_tokenizer, tmp_path):
    out = export_model(tiny_model(seed=43, vocab_size=VOCAB), tmp_path / "export", ouro_tokenizer)
    written = json.loads((out / "generation_config.json").read_text())
    expected = {"do_sample": True, "temperature": 1.0, "top_p": 0.7, "eos_token_id": [2, 0], "pad_token_id": 0}
    assert {k: written[k] for k in expected} == expected
    loaded = GenerationConfig.from_pretrained(out)
    assert (loaded.do_sample, loaded.temperature, loaded.top_p) == (True, 1.0, 0.7)


@pytest.mark.parametrize("which", ["ouro", "project"])
def test_tokenizer_config_is_in_the_form_4x_and_5x_read(which, ouro_tokenizer, tokenizer_of_the_project, tmp_path):
    tokenizer = ouro_tokenizer if which == "ouro" else tokenizer_of_the_project
    vocab = VOCAB if which == "ouro" else len(tokenizer)
    out = export_model(tiny_model(seed=44, vocab_size=vocab), tmp_path / "export", tokenizer)
    config = json.loads((out / "tokenizer_config.json").read_text())
    # transformers 4.x: "Tokenizer class TokenizersBackend does not exist"; "'list' object has no attribute 'keys'"
    assert config["tokenizer_class"] in ("PreTrainedTokenizerFast", "GPT2Tokenizer")
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    assert not {"is_local", "local_files_only"} & config.keys()
    assert config["chat_template"] == (out / "chat_template.jinja").read_text() == tokenizer.chat_template

    again = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert again.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    assert again(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert again.all_special_tokens == tokenizer.all_special_tokens
    assert (again.eos_token, again.pad_token, again.bos_token) == (tokenizer.eos_token, tokenizer.pad_token,
                                                                   tokenizer.bos_token)


def test_model_card_names_the_base_model_and_its_licence(ouro_tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_model(seed=45, vocab_size=VOCAB).save_pretrained(base)
    (base / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apache-2.0\n---\n# Base\n")
    out = export_model(AutoModelForCausalLM.from_pretrained(base), tmp_path / "export", ouro_tokenizer)
    card = (out / "README.md").read_text()
    assert "\nlicense: apache-2.0\n---\n" in card and card.startswith("---\n")
    assert f"- Base model: `{base}`" in card and "`apache-2.0` (from its model card)" in card
    assert "bf16 weights; 3 recurrent steps" in card and "--remote-code DIR" in card
