"""The run schema: choice fields fail while Hydra composes the config, value checks in `to_object` name
the field by its dotted path, and the Enums match what the model accepts."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from ouro_train.cli import recipes_dir
from ouro_train.config import AttnImplementation, Checkpointing, ConfigError, Objective, WandbMode, to_object
from ouro_train.model import CHECKPOINT_GRANULARITIES
from ouro_train.model.attention import IMPLEMENTATIONS


def load(overrides=(), name="smoke"):
    with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
        return to_object(compose(config_name=name, overrides=list(overrides)))


@pytest.mark.parametrize(
    "override, full_key, choices",
    [
        ("model.checkpointing=blocks", "model.checkpointing",
         "[none, layer/4, layer/2, layer:save_matmul, layer:save_attn, layer, step, step+layer:save_matmul, "
         "step+layer:save_attn, step+layer, auto]"),
        ("model.attn_implementation=flash", "model.attn_implementation", "[sdpa, eager, flex_attention]"),
        ("objective.name=expected_logit", "objective.name", "[expected_logits, expected_loss, final_step, gate]"),
        ("wandb.mode=on", "wandb.mode", "[offline, online, disabled]"),
    ],
)
def test_a_mistyped_choice_fails_when_the_config_is_composed(override, full_key, choices):
    with pytest.raises(ConfigCompositionException) as e:
        load([override])
    message = str(e.value.__cause__)
    assert f"full_key: {full_key}" in message and f"expected one of {choices}" in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
        ("optim.betas=[0.9,1.5]", "optim.betas: must be two values in [0, 1)"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: must be 0..3, got 4"),
        ("deepspeed.offload_optimizer=true deepspeed.zero_stage=0", "deepspeed.offload_optimizer: needs zero_stage >= 1"),
        ("lora.target_modules=[qkv]", "lora.target_modules: ['qkv'] are not Ouro projections"),
        ("train.global_batch_tokens=1024", "train.global_batch_tokens: set train.global_batch_size or"),
        ("train.global_batch_size=null train.global_batch_tokens=1000", "train.global_batch_tokens: 1000 is not a multiple"),
        ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps: must be >= 1, got 0"),
        ("checkpoint.every_n_minutes=0", "checkpoint.every_n_minutes: must be > 0 (null: steps only), got 0.0"),
        ("eval.ut_steps=[0,2]", "eval.ut_steps: must be >= 1, got [0, 2]"),
        ("objective.loss_chunk_tokens=0", "objective.loss_chunk_tokens: must be >= 1, got 0"),
        ("objective.name=gate lora.enabled=true", "objective.name: gate trains the exit gate alone"),
        ("max_steps=0", "max_steps: must be >= 1, got 0"),
        ("data.max_seq_len=1", "data.max_seq_len: must be >= 2, got 1"),
        ("plan.gpus=0", "plan.gpus: must be >= 1, got 0"),
        ("plan.mfu=1.5", "plan.mfu: must be in (0, 1], got 1.5"),
        ("plan.gpu_memory_gib=0", "plan.gpu_memory_gib: must be > 0, got 0"),
        ("model.compile=yes", "model.compile: must be true, false or auto, got 'yes'"),
        ("model.compile=true deepspeed.zero_stage=3", "model.compile: true does not work with deepspeed.zero_stage=3"),
    ],
)
def test_a_bad_value_fails_at_parse_time_naming_its_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(override.split())
    assert str(e.value).startswith(message), str(e.value)


def test_choices_are_typed_and_every_recipe_parses():
    run = load(["model.checkpointing=step+layer", "objective.name=gate", "wandb.mode=disabled"])
    assert run.model.checkpointing is Checkpointing["step+layer"] and run.objective.name is Objective.gate
    assert run.wandb.mode is WandbMode.disabled and run.model.attn_implementation is AttnImplementation.sdpa
    for recipe in ("smoke", "thinking_sft", "lora_domain", "sft"):
        load(name=recipe)


def test_config_choices_are_what_the_model_accepts():
    # `auto` is resolved to one of the model's granularities before the model is built.
    assert [c.value for c in Checkpointing] == [*CHECKPOINT_GRANULARITIES, "auto"]
    assert [a.value for a in AttnImplementation] == list(IMPLEMENTATIONS)


def test_compile_is_auto_in_every_recipe_and_on_only_for_cuda():
    for recipe in ("smoke", "thinking_sft", "lora_domain"):
        run = load(name=recipe)
        assert run.model.compile == "auto", recipe
        assert run.compiles("cuda") and not run.compiles("cpu"), recipe
    # ZeRO-3 is not compiled by `auto` (an explicit true is refused above); true/false are taken as given.
    assert not load(["deepspeed.zero_stage=3"]).compiles("cuda")
    assert load(["model.compile=true"]).compiles("cpu")
    assert not load(["model.compile=false"]).compiles("cuda")
