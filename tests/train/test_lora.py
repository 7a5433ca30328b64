"""LoRA settings: recipe keys -> peft, checked against what peft's layers then do, and LoRA+'s parameter
groups against peft's own `create_loraplus_optimizer`."""

import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer

from conftest import tiny_model
from train_helpers import compose_run
from ouro_train.train.engine import loraplus_param_groups, param_groups
from ouro_train.config import OURO_LINEAR_MODULES, ConfigError, LoraConfig, LoraInit
from ouro_train.train.lora import apply_lora, peft_config


def _adapted(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_recipe_keys_reach_peft():
    cfg = compose_run("lora.enabled=true", "lora.use_dora=true", "lora.use_rslora=true", "lora.init=pissa",
                      "lora.target_modules=all-linear", "lora.loraplus_lr_ratio=16", recipe="lora_domain").lora
    assert (cfg.init, cfg.target_modules, cfg.loraplus_lr_ratio) == (LoraInit.pissa, "all-linear", 16.0)
    config = peft_config(cfg)
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "pissa")
    assert compose_run(recipe="lora_domain").lora.target_modules == OURO_LINEAR_MODULES


@pytest.mark.parametrize("override", ["lora.use_qlora=true", "lora.init=loftq", "lora.use_dora=maybe"])
def test_unknown_lora_keys_and_values_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0]):
        compose_run(override, recipe="lora_domain")


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "lm_head"], r"lora.target_modules: \['lm_head'\] are not Ouro projections"),
    ("q_proj", "lora.target_modules: must be 'all-linear' or a list"),
])
def test_bad_targets_name_the_field(targets, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(enabled=True, target_modules=targets).check("lora")
    with pytest.raises(ConfigError, match=message):
        compose_run("lora.enabled=true", f"lora.target_modules={targets}".replace("'", ""))


def test_all_linear_adapts_the_projections_and_not_the_exit_gate():
    everything = apply_lora(tiny_model(seed=61), LoraConfig(enabled=True, target_modules="all-linear"))
    listed = apply_lora(tiny_model(seed=61), LoraConfig(enabled=True))
    assert _adapted(everything) == _adapted(listed)
    assert {name.rsplit(".", 1)[1] for name in _adapted(everything)} == set(OURO_LINEAR_MODULES)


def test_rslora_scales_by_alpha_over_sqrt_r_and_dora_learns_a_magnitude():
    model = apply_lora(tiny_model(seed=62), LoraConfig(enabled=True, r=4, alpha=8, use_rslora=True, use_dora=True))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and magnitude.shape == (q_proj.base_layer.out_features,)


@torch.no_grad()
@pytest.mark.parametrize("init", [LoraInit.pissa, LoraInit.olora])
def test_base_changing_inits_keep_the_model_and_move_part_of_w_into_the_adapter(init):
    base = tiny_model(seed=63)
    original = base.model.layers[0].mlp.down_proj.weight.clone()
    ids = torch.randint(3, 128, (2, 9))
    expected = base(ids).logits
    model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=4, dropout=0.0, init=init))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    residual = layer.base_layer.weight
    update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert (residual - original).abs().max() > 1e-3  # the base really changed ...
    torch.testing.assert_close(residual + update, original, rtol=0, atol=1e-5)  # ... by what the adapter holds
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-4)


def test_loraplus_groups_give_each_parameter_peft_loraplus_rate():
    lr, ratio = 1e-3, 16.0
    model = get_peft_model(tiny_model(seed=64), peft_config(LoraConfig(
        enabled=True, use_dora=True, modules_to_save=["early_exit_gate", "norm"])))
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    expected = {id(p): group["lr"] for group in reference.param_groups for p in group["params"]}
    groups = loraplus_param_groups(model, weight_decay=0.1, lr=lr, lr_ratio=ratio)
    got = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert got == expected
    assert groups[0]["lr"] == lr  # the trainer logs the first group's rate
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert all((wd == 0.1) == (p.dim() >= 2) for n, p in model.named_parameters() if p.requires_grad
               for wd in [decay[n]])
    assert {ratio * lr} == {got[id(p)] for n, p in model.named_parameters() if "lora_B" in n}


def test_groups_decay_zero3_partitioned_matrices():
    """Under ZeRO-3 a parameter is an empty vector between uses; its real shape is `ds_shape`."""
    model = torch.nn.Module()
    model.lora_B = torch.nn.Parameter(torch.empty(0))
    model.lora_B.ds_shape = torch.Size([8, 4])
    model.bias = torch.nn.Parameter(torch.empty(0))
    model.bias.ds_shape = torch.Size([8])
    assert [(len(g["params"]), g["weight_decay"]) for g in param_groups(model, 0.1)] == [(1, 0.1), (1, 0.0)]
    groups = loraplus_param_groups(model, 0.1, lr=1.0, lr_ratio=4.0)
    assert [(g["params"][0] is model.lora_B, g["weight_decay"], g["lr"]) for g in groups] == [(True, 0.1, 4.0),
                                                                                             (False, 0.0, 4.0)]
