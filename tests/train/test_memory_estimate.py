"""The dry run's memory estimate (train/memory.py) against the peak of the same step run for real.

The real step runs on the CPU in fp32 with torch's AdamW (what ZeRO-0 keeps on one rank: parameters,
gradients, two Adam moments). Its peak comes from the CPU allocator itself: the profiler records
every allocation and free of the step (the allocator reports each to it), a different path from the
estimator's fake-tensor trace. At real layer widths the parameters are large next to the
activations, so counting a view of a weight as an allocation shows there."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import tiny_config
from ouro_train.config import DeepSpeedConfig, LoraConfig
from ouro_train.model import CHECKPOINT_GRANULARITIES, OuroForCausalLM
from ouro_train.train import trainable
from ouro_train.train.memory import (
    StepShape,
    StoragePeak,
    _drop_grad,
    meta_model,
    model_state_bytes,
    run_step,
    step_memory,
    trace_step,
)
from train_helpers import compose_run

# Large enough that activations, not allocator noise, make the peak; small enough for seconds per step.
CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=32, total_ut_steps=3, max_position_embeddings=1024)
ZERO0 = DeepSpeedConfig(zero_stage=0)


def estimated_peak(seq_len: int, checkpointing: str) -> int:
    shape = StepShape(seq_len=seq_len, checkpointing=checkpointing, bf16=False)
    return step_memory(tiny_config(**CONFIG), shape, ZERO0, world_size=1)["peak"]


def measured_peak(seq_len: int, checkpointing: str) -> int:
    """Bytes held at the peak of a second training step (the first creates Adam's moments)."""
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(**CONFIG))
    model.config.use_cache = False
    model.set_activation_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = StepShape(seq_len=seq_len, checkpointing=checkpointing, bf16=False)
    run_step(model, shape)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *_adam_moments(optimizer)])
    return held + allocator_peak(lambda: (run_step(model, shape), optimizer.step()))


def allocator_peak(work) -> int:
    """The most bytes the CPU allocator holds at once while `work()` runs, above what it held before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _adam_moments(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]


@pytest.mark.parametrize("checkpointing", ["none", "step+layer"])
def test_estimate_is_within_10_percent_of_the_measured_peak(checkpointing):
    estimate, measured = estimated_peak(512, checkpointing), measured_peak(512, checkpointing)
    assert abs(estimate / measured - 1) <= 0.10, (estimate, measured)


def test_a_view_of_a_weight_is_no_allocation():
    """A frozen wide Linear on 8 tokens: F.linear passes `w.t()`, a view of the 4 MiB weight; only the
    8 × 1024 fp32 output (32 KiB) is new."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    linear = torch.nn.Linear(1024, 1024, bias=False).requires_grad_(False)
    x = torch.randn(8, 1024)
    with StoragePeak() as real:
        linear(x)
    with FakeTensorMode(allow_non_fake_inputs=True):
        linear.to_empty(device="cpu")
        fake_x = torch.empty(8, 1024)
        with StoragePeak() as fake:
            linear(fake_x)
    assert real.peak == fake.peak == 8 * 1024 * 4


# Ouro-1.4B's layer widths, two layers looped twice; a small vocabulary (the head is no layer width).
WIDE = dict(vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=16, head_dim=128, total_ut_steps=2, max_position_embeddings=1024)
WIDE_SEQ = 64


@pytest.fixture(scope="module")
def wide_models():
    """The wide model fully trained and with LoRA (frozen base weights: the view case), built once."""
    torch.manual_seed(0)
    models = {}
    for lora in (False, True):
        with torch.device("meta"):
            model = OuroForCausalLM(tiny_config(**WIDE))
        model.to_empty(device="cpu")
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.02)
        lora_cfg = LoraConfig(enabled=lora, dropout=0.0)
        models[lora] = trainable.make_trainable(model, "none", lora_cfg, StepShape(1).objective), lora_cfg
    return models


# Every policy with LoRA (frozen weights: where views were counted); full training's peak is the
# weight-sized gradients, checked once.
@pytest.mark.parametrize("checkpointing, lora", [*((c, True) for c in CHECKPOINT_GRANULARITIES), ("none", False)])
def test_estimate_matches_the_allocator_at_real_layer_widths(wide_models, checkpointing, lora):
    """The activation peak of one step (gradients handed off as ZeRO-2 does) within 10% of the CPU
    allocator's live peak of the same step on real tensors, for every checkpointing policy."""
    model, lora_cfg = wide_models[lora]
    shape = StepShape(seq_len=WIDE_SEQ, checkpointing=checkpointing, bf16=False, lora=lora_cfg)
    estimate = trace_step(meta_model(tiny_config(**WIDE), shape), shape).activation_bytes

    model.set_activation_checkpointing(checkpointing)
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    measured = allocator_peak(lambda: run_step(model, shape))
    for hook in hooks:
        hook.remove()
    assert abs(estimate / measured - 1) <= 0.10, (estimate, measured)


def test_estimate_grows_with_the_sequence_length():
    peaks = [estimated_peak(seq, "layer") for seq in (64, 128, 256)]
    assert peaks[0] < peaks[1] < peaks[2]


def test_stronger_checkpointing_needs_less_memory():
    none, layer, step_layer = (estimated_peak(256, c) for c in ("none", "layer", "step+layer"))
    assert none > layer > step_layer


def test_zero_stages_partition_the_model_states_as_deepspeed_does():
    # Ouro-1.4B under bf16 mixed precision on 8 ranks, everything trainable (ZeRO paper, Fig. 1: 2 + 2 + 12 bytes).
    total, n = 1_434_652_673, 8
    stage2 = model_state_bytes(total, total, 0, DeepSpeedConfig(zero_stage=2, reduce_bucket_size=0), n, bf16=True)
    assert stage2 == {"parameters": 2 * total, "gradients": 2 * -(-total // n), "optimizer": -(-12 * total // n)}
    stage1 = model_state_bytes(total, total, 0, DeepSpeedConfig(zero_stage=1), n, bf16=True)
    assert stage1["gradients"] == 2 * total
    offloaded = model_state_bytes(total, total, 0, DeepSpeedConfig(zero_stage=2, offload_optimizer=True), n, bf16=True)
    assert offloaded["optimizer"] == 0


def test_dry_run_plans_memory_and_auto_checkpointing(tmp_path):
    from ouro_train.train import memory
    from ouro_train.train.plan import compute_plan, format_compute_plan, write_plan
    from ouro_train.train.trainable import architecture

    def run(gib: float):
        return compose_run("dry_run=true", "deepspeed=zero0", "plan.gpus=1", "model.checkpointing=auto",
                           "data.max_seq_len=256", f"plan.gpu_memory_gib={gib}", f"output_dir={tmp_path}")

    def peak(recipe, checkpointing: str, seq_len: int | None = None) -> int:
        shape = memory.step_shape(recipe, checkpointing, seq_len)
        return memory.step_memory(architecture(recipe, planning=True), shape, recipe.deepspeed, 1)["peak"]

    unchecked = peak(run(1), "none")
    roomy_gib = 3 * unchecked / memory.GIB + memory.CONTEXT_RESERVE_GIB  # room for a few times the length
    roomy = compute_plan(run(roomy_gib))
    assert roomy["checkpointing"] == "none"
    written = write_plan(roomy, str(tmp_path)).read_text()
    assert '"peak_gib"' in written and '"components"' in written and '"time"' in written and '"fits"' in written
    # Every policy with its peak, model and executed FLOPs; the chosen one's executed FLOPs set the time.
    policies = json.loads(written)["policies"]
    assert list(policies) == list(CHECKPOINT_GRANULARITIES)
    for row in policies.values():
        assert row["executed_over_model_flops"] == row["executed_flops_per_token"] / row["model_flops_per_token"] > 1
    assert roomy["time"]["hardware_flops_per_token"] == policies["none"]["executed_flops_per_token"]
    shown = format_compute_plan(roomy)
    assert "checkpointing policies" in shown and all(f"  {policy} " in shown for policy in policies)

    # The longest length that fits: its own estimate fits, 512 tokens more does not.
    longest = roomy["memory"]["longest_max_seq_len"]
    assert memory.fits(peak(run(roomy_gib), "none", longest), roomy_gib)
    assert not memory.fits(peak(run(roomy_gib), "none", longest + 512), roomy_gib)

    # A budget the unchecked step just exceeds: auto picks a checkpointed granularity that meets it.
    tight_gib = unchecked / memory.GIB + memory.CONTEXT_RESERVE_GIB - 1e-4
    tight = run(tight_gib)
    table = memory.policy_table(tight, architecture(tight, planning=True), 1)
    chosen = memory.choose_checkpointing(table, tight_gib)
    assert chosen != "none" and memory.fits(peak(tight, chosen), tight_gib)
    # ... the one executing the fewest FLOPs among those that fit
    fitting = [p for p, row in table.items() if memory.fits(row["peak"], tight_gib)]
    assert all(table[chosen]["executed_flops_per_token"] <= table[p]["executed_flops_per_token"] for p in fitting)
