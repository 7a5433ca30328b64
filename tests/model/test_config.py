"""OuroConfig reads upstream config.json files and writes upstream's layout back."""

import json

import pytest
import torch
from transformers import AutoConfig

from conftest import shared_path, tiny_config
from ouro_train import OuroConfig, OuroForCausalLM

OURO_1_4B_PARAMS = 1_434_652_673


def test_upstream_defaults():
    c = OuroConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151936, 4096, 22016, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (32, 32, 32768)
    assert (c.rope_theta, c.rope_scaling, c.rms_norm_eps, c.initializer_range) == (10000.0, None, 1e-6, 0.02)
    assert (c.use_sliding_window, c.sliding_window, c.max_window_layers) == (False, None, 28)
    assert c.layer_types == ["full_attention"] * 32
    assert (c.total_ut_steps, c.early_exit_threshold, c.use_cache, c.tie_word_embeddings) == (4, 1.0, True, False)
    assert (c.hidden_act, c.attention_dropout) == ("silu", 0.0)
    assert OuroConfig(num_key_value_heads=None).num_key_value_heads == 32


def test_ouro_1_4b_config_builds_exact_shapes_on_meta():
    config = AutoConfig.from_pretrained(shared_path("ouro-1.4b-files"))
    assert isinstance(config, OuroConfig)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 5632, 24)
    assert (config.num_attention_heads, config.resolved_head_dim, config.vocab_size) == (16, 128, 49152)
    assert (config.rope_theta, config.total_ut_steps, config.tie_word_embeddings) == (1_000_000.0, 4, False)
    with torch.device("meta"):
        model = OuroForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == OURO_1_4B_PARAMS
    state = model.state_dict()
    assert len(state) == 269
    assert state["model.layers.23.post_attention_layernorm_2.weight"].shape == (2048,)
    assert state["model.early_exit_gate.weight"].shape == (1, 2048)
    assert state["model.early_exit_gate.bias"].shape == (1,)
    assert state["lm_head.weight"].shape == (49152, 2048)


def test_total_ut_steps_override_when_loading():
    config = AutoConfig.from_pretrained(shared_path("ouro-1.4b-files"), total_ut_steps=8)
    assert config.total_ut_steps == 8


def test_saved_json_keeps_upstream_layout(tmp_path):
    tiny_config(rope_theta=1e6).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ouro"
    assert saved["rope_theta"] == 1e6 and saved["rope_scaling"] is None
    assert "rope_parameters" not in saved
    assert saved["head_dim"] == 16 and saved["total_ut_steps"] == 3 and saved["early_exit_threshold"] == 1.0
    again = OuroConfig.from_pretrained(tmp_path)
    assert again.rope_theta == 1e6 and again.resolved_head_dim == 16


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(total_ut_steps=0), "total_ut_steps"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(layer_types=["full_attention", "linear_attention"]), "unknown layer_types"),
    ],
)
def test_invalid_config_fails_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_unsupported_rope_type_fails_clearly():
    with pytest.raises(ValueError, match="rope type"):
        OuroForCausalLM(tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
