"""Executed FLOPs of the dry run's traced step (train/memory.py): torch's FLOP counter over forward,
recomputation, backward and objective on fake tensors, against the closed forms of model/flops.py and
against the forwards each policy recomputes."""

import pytest

from conftest import tiny_config
from ouro_train.config import DeepSpeedConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES
from ouro_train.model.flops import hardware_flops_per_token
from ouro_train.train.memory import StepShape, step_memory

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=32, total_ut_steps=3)
SEQ = 64


def executed(checkpointing: str, step_losses: bool = False) -> float:
    shape = StepShape(seq_len=SEQ, checkpointing=checkpointing, bf16=False, step_losses=step_losses)
    return step_memory(tiny_config(**CONFIG), shape, DeepSpeedConfig(zero_stage=2), 1)["executed_flops_per_token"]


# Forwards of the layer stack each policy re-runs, as (matmul part, attention part), for T · L = 6 layer
# applications: `layer/k` checkpoints applications 0, k, 2k, ... (layer/4: 2 of 6); `save_matmul` keeps
# every matmul and attention output, `save_attn` the attention outputs; a step checkpoint re-runs the stack.
RECOMPUTED = {"layer/4": (2 / 6, 2 / 6), "layer/2": (3 / 6, 3 / 6), "layer:save_matmul": (0, 0),
              "layer:save_attn": (1, 0), "layer": (1, 1), "step": (1, 1), "step+layer:save_matmul": (1, 1),
              "step+layer:save_attn": (2, 1), "step+layer": (2, 2)}


def test_every_policy_has_its_expected_recomputation():
    assert set(RECOMPUTED) == set(CHECKPOINT_GRANULARITIES) - {"none"}


def layer_stack_forward_flops_per_token() -> tuple[float, float]:
    """T · L layer applications: 2 FLOPs per weight of q, k, v, o, gate, up, down, and causal attention's
    Q·Kᵀ and P·V (2 · S · head_dim each per head, half of them masked)."""
    d, ffn, heads, kv, hd = (CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_key_value_heads", "head_dim"))
    weights = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ffn
    attention = 2 * 2 * SEQ * heads * hd / 2
    applications = CONFIG["total_ut_steps"] * CONFIG["num_hidden_layers"]
    return applications * 2 * weights, applications * attention


def test_without_checkpointing_the_count_is_the_closed_form():
    config = tiny_config(**CONFIG)
    assert executed("none") == pytest.approx(hardware_flops_per_token(config, SEQ, "none"), rel=0.02)


@pytest.mark.parametrize("checkpointing", sorted(RECOMPUTED))
def test_each_policy_adds_exactly_the_forwards_it_recomputes(checkpointing):
    added = executed(checkpointing) - executed("none")
    (matmul, attention), (matmul_flops, attention_flops) = RECOMPUTED[checkpointing], layer_stack_forward_flops_per_token()
    assert added == pytest.approx(matmul * matmul_flops + attention * attention_flops, rel=1e-9, abs=1e-6)


def test_per_step_losses_cost_one_head_projection_per_step_unless_skipped():
    """expected_logits uses no step's own loss: logging them projects every supervised token (all but
    the first) through the head once per recurrent step; steps that do not log skip that."""
    head = 2 * CONFIG["vocab_size"] * CONFIG["hidden_size"]
    added = executed("none", step_losses=True) - executed("none")
    assert added == pytest.approx(CONFIG["total_ut_steps"] * head * (SEQ - 1) / SEQ, rel=1e-9)
