"""`export_model` on in-memory models: the files of an export, sharding, LoRA, remote code, errors."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import assert_instances_agree, shared_path, tiny_model
from ouro_train.export import ExportError, export_model

VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))


@torch.no_grad()
def test_export_files_and_reload(tokenizer, tmp_path):
    model = tiny_model(seed=31, vocab_size=VOCAB)
    out = export_model(model, tmp_path / "export", tokenizer, dtype="fp32")
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "README.md",
    }
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [2, 0] and generation.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens(generation.eos_token_id) == ["<|im_end|>", "<|endoftext|>"]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    assert (config["total_ut_steps"], config["early_exit_threshold"], config["dtype"]) == (3, 1.0, "float32")
    assert config["rope_theta"] == 10000.0 and "rope_parameters" not in config  # upstream's layout

    assert load_file(out / "model.safetensors").keys() == model.state_dict().keys()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    assert_instances_agree(reloaded(ids).logits, model(ids).logits)

    messages = [{"role": "user", "content": "What is 2+2?"}]
    again = AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def test_sharded_export_has_an_index_and_reloads(tokenizer, tmp_path):
    model = tiny_model(seed=32, vocab_size=VOCAB)
    out = export_model(model, tmp_path / "sharded", tokenizer, dtype="fp32", max_shard_size="4MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    ids = torch.randint(3, VOCAB, (1, 7))
    assert_instances_agree(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, model(ids).logits)


@torch.no_grad()
def test_peft_model_merged_without_touching_the_original(tokenizer, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                        modules_to_save=["early_exit_gate"], init_lora_weights=False)
    peft = get_peft_model(tiny_model(seed=33, vocab_size=VOCAB), config)
    with torch.no_grad():  # the trained copy of the gate differs from the frozen original
        peft.base_model.model.model.early_exit_gate.modules_to_save["default"].bias.add_(3.0)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    ids = torch.randint(3, VOCAB, (2, 8))
    expected = peft.eval()(ids)
    out = export_model(peft, tmp_path / "merged", tokenizer, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids)
    torch.testing.assert_close(merged.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.exit_pdf, expected.exit_pdf, rtol=0, atol=1e-5)
    with peft.disable_adapter():  # the gate's trained copy is what the export carries
        assert (peft(ids).exit_pdf - merged.exit_pdf).abs().max() > 0.05
    after = peft.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_remote_code_files_and_auto_map(tokenizer, tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    for name in ("configuration_ouro.py", "modeling_ouro.py"):
        (upstream / name).write_text(f"# {name}\n")
    out = export_model(tiny_model(seed=34, vocab_size=VOCAB), tmp_path / "export", tokenizer, remote_code_dir=upstream)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_ouro.OuroConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ouro.OuroForCausalLM"
    assert (out / "modeling_ouro.py").read_text() == "# modeling_ouro.py\n"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # our own class, no remote code run

    (upstream / "modeling_ouro.py").unlink()
    with pytest.raises(ExportError, match="modeling_ouro.py not found"):
        export_model(tiny_model(seed=34, vocab_size=VOCAB), tmp_path / "again", tokenizer, remote_code_dir=upstream)
    assert not (tmp_path / "again").exists() and not (tmp_path / ".again.partial").exists()


def test_errors_name_the_problem(tokenizer, tmp_path):
    model = tiny_model(seed=35, vocab_size=VOCAB)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(model, tmp_path / "taken", tokenizer)
    export_model(model, tmp_path / "taken", tokenizer, overwrite=True)
    assert not (tmp_path / "taken" / "file").exists()

    with pytest.raises(ExportError, match="needs a LoRA run"):
        export_model(model, tmp_path / "x", tokenizer, mode="merge")
    with pytest.raises(ExportError, match="vocab_size is 128"):
        export_model(tiny_model(seed=35), tmp_path / "x", tokenizer)
    with torch.no_grad():
        model.model.norm.weight.data = torch.empty(0)  # what ZeRO-3 leaves outside GatheredParameters
    with pytest.raises(ExportError, match="model.norm.weight is empty.*GatheredParameters"):
        export_model(model, tmp_path / "x", tokenizer)
