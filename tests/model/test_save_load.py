"""Save -> reload through the Auto classes preserves the model exactly, in upstream's layout."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_instances_agree, shared_path, tiny_model


@torch.no_grad()
def test_round_trip_preserves_weights_exactly_and_logits(tmp_path):
    model = tiny_model(seed=21)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # What save/load guarantees: every tensor bitwise, and the config.
    before, after = model.state_dict(), reloaded.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor), name
    settings = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert settings(reloaded.config) == settings(model.config)
    # Two instances: logits agree to float32 ulps (CPU kernels may take alignment-dependent paths).
    ids = torch.randint(3, 128, (2, 9))
    for kwargs in ({}, {"exit_at_step": 0}, {"exit_threshold": 0.4}, {"labels": ids}):
        a, b = model(ids, **kwargs), reloaded(ids, **kwargs)
        assert_instances_agree(b.logits, a.logits)
        if "labels" in kwargs:
            assert_instances_agree(b.loss, a.loss)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["OuroForCausalLM"] and saved["model_type"] == "ouro"


def test_state_dict_names_match_the_upstream_checkpoint(tmp_path):
    upstream = load_file(shared_path("fixtures", "ouro_tiny_ref", "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(shared_path("fixtures", "ouro_tiny_ref"))
    model.save_pretrained(tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    assert ours.keys() == upstream.keys()
    for name in upstream:
        assert torch.equal(ours[name], upstream[name]), name


@torch.no_grad()
def test_total_ut_steps_override_when_loading(tmp_path):
    model = tiny_model(seed=22, total_ut_steps=3)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, total_ut_steps=6).eval()
    ids = torch.randint(3, 128, (1, 6))
    out = reloaded(ids)
    assert out.exit_pdf.shape[-1] == 6
    assert_instances_agree(out.logits, model(ids, total_ut_steps=6).logits)


@torch.no_grad()
def test_bf16_load_keeps_fp32_rope_tables(tmp_path):
    model = tiny_model(seed=23)
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.dtype == torch.bfloat16
    # `.to(bf16)` after loading must not round the RoPE inverse frequencies either.
    again = tiny_model(seed=23).to(torch.bfloat16)
    positions = torch.arange(256)[None]
    reference = model.model.rotary_emb(positions, torch.float32)
    for converted in (bf16, again):
        assert converted.model.rotary_emb._inv_freq(torch.device("cpu")).dtype == torch.float32
        # bf16-rounded frequencies would be off by ~0.4 rad at position 255
        for table, expected in zip(converted.model.rotary_emb(positions, torch.float32), reference):
            assert_instances_agree(table, expected)
    ids = torch.randint(3, 128, (1, 6))
    torch.testing.assert_close(bf16(ids, exit_at_step=2).logits, again(ids, exit_at_step=2).logits, rtol=0, atol=2e-2)
