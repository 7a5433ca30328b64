"""Every activation checkpointing policy gives the gradients of no checkpointing for every objective,
with LoRA adapters (dropout on: the recompute must draw the forward's masks), and inside the trainer's
DeepSpeed engine under ZeRO-2 and ZeRO-3 (which gathers each layer's parameters again for a recompute).

Under ZeRO, one engine per stage serves every (objective, policy): the same micro-batch runs forward and backward
under each, its full gradient is read, and a step at learning rate 0 clears it without moving a weight
(after one real step has moved the adapters' B matrices off their initial zeros, so A has gradients too).
"""

import pytest
import torch
from deepspeed.utils import safe_get_full_grad

from conftest import tiny_model
from train_helpers import compose_run
from ouro_train.config import LoraConfig, Objective, ObjectiveConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES
from ouro_train.train.lora import apply_lora
from ouro_train.train.objectives import compute_objective
from ouro_train.train.trainer import Trainer

OBJECTIVES = (Objective.expected_logits, Objective.expected_loss, Objective.final_step)


def _model(objective: Objective):
    """LoRA on a tiny model (B matrices off their zero init, so A has gradients), or for the gate
    objective the tiny model with everything but the exit gate frozen, as the trainer builds them."""
    model = tiny_model(seed=5, total_ut_steps=3).train()
    if objective == Objective.gate:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("model.early_exit_gate."))
        return model
    model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02, generator=gen)
    return model


def _objective_gradients(objective: Objective, policy: str) -> dict[str, torch.Tensor]:
    model = _model(objective)
    model.set_activation_checkpointing(policy)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :6] = -100
    position_ids = torch.cat([torch.arange(9), torch.arange(15)])[None].expand(2, -1)  # two documents a row
    torch.manual_seed(11)  # the same dropout masks under every policy
    out = model(input_ids=ids, position_ids=position_ids, use_cache=False, compute_logits=False)
    obj = compute_objective(ObjectiveConfig(objective, entropy_beta=0.05), out, labels, model.get_output_embeddings())
    obj.loss_sum.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective", [*OBJECTIVES, Objective.gate])
def test_every_policy_has_the_gradients_of_none_for_every_objective(objective):
    reference = _objective_gradients(objective, "none")
    assert reference and all(g.abs().sum() > 0 for g in reference.values())
    for policy in CHECKPOINT_GRANULARITIES[1:]:
        grads = _objective_gradients(objective, policy)
        assert grads.keys() == reference.keys()
        for name, ref in reference.items():
            rel = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
            assert rel <= 1e-6, f"{objective.name}, {policy}: {name} differs (relative {rel:.1e})"


def _gradients(trainer: Trainer, mb: dict, policy: str) -> dict[str, torch.Tensor]:
    trainer.engine.module.set_activation_checkpointing(policy)
    torch.manual_seed(7)  # LoRA dropout draws the same masks under every policy
    trainer.engine.backward(trainer._forward(mb).loss_sum)
    grads = {name: safe_get_full_grad(p).detach().clone()
             for name, p in trainer.engine.module.named_parameters() if p.requires_grad}
    trainer.engine.step()  # lr 0: clears the gradient, leaves the weights
    return grads


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_every_policy_has_the_gradients_of_none_under_zero(tmp_path, data_cache, zero):
    cfg = compose_run(f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled",
                      "export_at_end=false", f"deepspeed={zero}", "lora.enabled=true", "lora.dropout=0.2",
                      "lora.r=4", "optim.lr=0.01", "optim.warmup_steps=0", "optim.weight_decay=0",
                      "train.micro_batch_size=1", "train.global_batch_size=1", "data.max_seq_len=128")
    trainer = Trainer(cfg)
    trainer.engine.train()
    mb = next(trainer._micro_batches())
    assert mb["position_ids"].eq(0).sum() > 1  # a packed row: the document mask is recomputed too
    _gradients(trainer, mb, "none")  # a real step
    for group in trainer.engine.optimizer.param_groups:
        group["lr"] = 0.0
    trainer.engine.lr_scheduler = None
    for objective in OBJECTIVES:
        trainer.cfg.objective.name = objective
        reference = _gradients(trainer, mb, "none")
        assert reference and all(g.abs().sum() > 0 for g in reference.values())
        for policy in CHECKPOINT_GRANULARITIES[1:]:
            grads = _gradients(trainer, mb, policy)
            assert grads.keys() == reference.keys()
            for name, ref in reference.items():
                rel = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
                assert rel <= 1e-5, f"{zero}, {objective.name}, {policy}: {name} differs (relative {rel:.1e})"
