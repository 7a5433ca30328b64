"""One home for what trains: the dry run's traced step and the trainer's step go through the same
functions of `train/trainable.py`, and the trainer builds the architecture the plan sizes."""

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from ouro_train.config import DeepSpeedConfig
from ouro_train.model import OuroForCausalLM
from ouro_train.train import memory, trainable
from ouro_train.train.trainer import Trainer
from train_helpers import compose_run


@pytest.fixture
def calls(monkeypatch):
    """Spies on trainable's functions: every call is recorded by name, then runs the real function."""
    seen = []
    for name in ("make_trainable", "micro_batch_objective"):
        real = getattr(trainable, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(trainable, name, spy)
    return seen


def test_the_plan_traces_the_step_the_trainer_runs(calls):
    run = compose_run("model.checkpointing=layer", "data.max_seq_len=32")
    config = trainable.architecture(run, planning=True)
    memory.step_memory(config, memory.step_shape(run, "layer"), DeepSpeedConfig(zero_stage=2), 1)
    assert calls == ["make_trainable", "micro_batch_objective"]

    calls.clear()
    trainer = SimpleNamespace(cfg=run, tokenizer=range(config.vocab_size), _checkpointing=lambda c: "layer",
                              device=torch.device("cpu"))
    model = Trainer._build_model(trainer)
    assert calls == ["make_trainable"] and model.model.activation_checkpointing == "layer"
    built = {k: v for k, v in model.config.to_diff_dict().items() if k != "dtype"}  # the dtype is the run's
    assert built == config.to_diff_dict()  # the architecture the plan sized

    calls.clear()
    trainer = SimpleNamespace(cfg=run, engine=model, lm_head=model.get_output_embeddings(), sp=None,
                              device=torch.device("cpu"), _step_losses=True)
    ids = torch.randint(0, config.vocab_size, (1, 32))
    mb = {"input_ids": ids, "labels": ids, "position_ids": None, "attention_mask": None}
    trained = Trainer._forward(trainer, mb)
    assert calls == ["micro_batch_objective"]
    # The plan's step on the same model and row: the same loss.
    traced = trainable.micro_batch_objective(model, model.get_output_embeddings(), mb, run.objective,
                                             torch.device("cpu"))
    assert torch.equal(trained.loss_sum, traced.loss_sum)


def test_the_planned_architecture_without_a_checkpoint_is_ouro_1_4b():
    planned = trainable.architecture(compose_run(recipe="thinking_sft"), planning=True)  # model.path: null
    assert (planned.hidden_size, planned.num_hidden_layers, planned.intermediate_size) == (2048, 24, 5632)
    sized = trainable.architecture(compose_run("plan.model_size=2.6b", recipe="thinking_sft"), planning=True)
    assert sized.num_hidden_layers == 48


def test_make_trainable_freezes_all_but_the_gate_for_the_gate_objective():
    run = compose_run("objective.name=gate")
    model = trainable.make_trainable(OuroForCausalLM(tiny_config()), "none", run.lora, run.objective)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
