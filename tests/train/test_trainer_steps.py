"""Trainer behaviour in one process: batch-split invariance, non-finite steps, gate and LoRA training,
checkpoint retention and the resume point."""

import json
import math
from pathlib import Path

import pytest
import torch

from train_helpers import compose_run, metrics, run_train
from ouro_train.run_dir import RunDir, module_states_file
from ouro_train.train import checkpoint
from ouro_train.train.trainer import StopTraining, Trainer


def make(tmp_path, data_cache, *overrides, cls=Trainer):
    cfg = compose_run(f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled",
                      "export_at_end=false", *overrides)
    return cls(cfg)


def module_state(run_dir, step):
    path = module_states_file(RunDir(run_dir).checkpoint(step))
    return torch.load(path, weights_only=False)["module"]


def test_one_step_is_independent_of_how_the_batch_is_split(tmp_path, data_cache):
    """(micro 4, accum 1), (micro 1, accum 4) and 2 processes × (micro 1, accum 2) see the same 4
    sequences (with different supervised-token counts) and must take the same optimizer step."""
    # With eps = 1 Adam's first update is lr·g/(1 + |g|): the parameters show the gradient's scale, so a
    # wrong loss normalisation cannot hide behind Adam's sign-like first step.
    common = ("max_steps=1", "train.global_batch_size=4", "deepspeed=zero2", "optim.warmup_steps=0",
              "optim.lr=1.0", "optim.eps=1.0", "optim.weight_decay=0")
    runs = {
        "mb4": ("train.micro_batch_size=4",),
        "mb1": ("train.micro_batch_size=1",),
    }
    for name, extra in runs.items():
        make(tmp_path / name, data_cache, *common, *extra).train()
    run_train(f"output_dir={tmp_path / 'ddp'}", f"data.cache_dir={data_cache}", "wandb.mode=disabled",
              "export_at_end=false", "train.micro_batch_size=1", *common, nproc=2)

    reference = module_state(tmp_path / "mb4", 1)
    initial = make(tmp_path / "init", data_cache, "max_steps=1").engine.module.state_dict()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1e-3  # the step did something
    ref_metrics = metrics(tmp_path / "mb4")[1]
    for name in ("mb1", "ddp"):
        state = module_state(tmp_path / name, 1)
        for key in reference:
            torch.testing.assert_close(state[key], reference[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
        got = metrics(tmp_path / name)[1]
        assert got["supervised_tokens"] == ref_metrics["supervised_tokens"]
        assert math.isclose(got["loss"], ref_metrics["loss"], rel_tol=1e-6)
        assert math.isclose(got["grad_norm"], ref_metrics["grad_norm"], rel_tol=1e-5)


class NaNForTwoSteps(Trainer):
    def _forward(self, mb):
        obj = super()._forward(mb)
        if self.state.step < 2:
            obj.loss_sum = obj.loss_sum * float("nan")
        return obj


class NaNAlways(Trainer):
    def _forward(self, mb):
        obj = super()._forward(mb)
        obj.loss_sum = obj.loss_sum * float("nan")
        return obj


@pytest.mark.parametrize("zero", ["zero0", "zero2"])
def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path, data_cache, zero):
    trainer = make(tmp_path, data_cache, "max_steps=3", f"deepspeed={zero}", "checkpoint.every_n_steps=1",
                   "checkpoint.keep_last=0", cls=NaNForTwoSteps)
    initial = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.train()
    records = metrics(tmp_path)
    assert [records[s]["step_applied"] for s in (1, 2, 3)] == [False, False, True]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[3]["loss"])
    assert records[3]["bad_steps"] == 2
    after_nan_steps, after_good_step = module_state(tmp_path, 2), module_state(tmp_path, 3)
    # Bitwise: a skipped update must leave every stored weight untouched, not merely close.
    for key, value in initial.items():
        assert torch.equal(after_nan_steps[key], value), f"a non-finite step changed {key}"
    assert any(not torch.equal(after_good_step[k], v) for k, v in initial.items())


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, data_cache):
    trainer = make(tmp_path, data_cache, "max_steps=5", "train.max_bad_steps=2", cls=NaNForTwoSteps)
    with pytest.raises(StopTraining, match="not finite for 2 optimizer steps in a row"):
        trainer.train()


def test_the_in_a_row_counter_survives_a_resume(tmp_path, data_cache):
    """Two bad steps, a checkpoint, a resume and one more bad step are three in a row."""
    make(tmp_path, data_cache, "max_steps=2", "checkpoint.every_n_steps=1", cls=NaNForTwoSteps).train()
    state = json.loads((RunDir(tmp_path).checkpoint(2) / "trainer_state.json").read_text())
    assert (state["bad_steps_in_row"], state["bad_steps_total"]) == (2, 2)
    resumed = make(tmp_path, data_cache, "max_steps=6", "train.max_bad_steps=3", "resume_allow_changes=[max_steps]",
                   cls=NaNAlways)
    assert (resumed.state.step, resumed.state.bad_steps_in_row) == (2, 2)
    with pytest.raises(StopTraining, match=r"3 optimizer steps in a row \(last: step 3\)"):
        resumed.train()


def test_gate_objective_trains_only_the_exit_gate(tmp_path, data_cache):
    trainer = make(tmp_path, data_cache, "max_steps=2", "objective.name=gate")
    assert trainer.trainable_params == 64 + 1  # Linear(64 -> 1)
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.train()
    after = trainer.engine.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}


def test_lora_trains_adapters_only_and_writes_its_config(tmp_path, data_cache):
    trainer = make(tmp_path, data_cache, "max_steps=2", "lora.enabled=true", "lora.r=4")
    trainable = trainer.trainable_params
    assert 0 < trainable < 20_000
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.train()
    after = trainer.engine.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "tokenizer.json").exists()


def test_keep_last_and_incomplete_checkpoints(tmp_path, data_cache):
    make(tmp_path, data_cache, "max_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2").train()
    kept = RunDir(tmp_path).complete_checkpoints()
    assert [p.name for p in kept] == ["step-00000003", "step-00000004"]
    # A newer directory without the COMPLETE marker (a write that was killed) is never the resume point.
    partial = RunDir(tmp_path).checkpoint(5)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert checkpoint.resolve_resume("auto", RunDir(tmp_path)) == kept[-1]
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        checkpoint.resolve_resume(str(partial), RunDir(tmp_path))
    assert checkpoint.resolve_resume("none", RunDir(tmp_path)) is None


def test_eval_runs_at_the_end_and_every_n_steps(tmp_path, data_cache):
    eval_file = Path(__file__).resolve().parents[2] / "data" / "eval" / "math_eval.jsonl"
    make(tmp_path / "end", data_cache, "max_steps=2", f"data.eval_files=[{eval_file}]").train()
    assert sorted(metrics(tmp_path / "end", split="eval")) == [2]  # every_n_steps=0: only the final one
    make(tmp_path / "every", data_cache, "max_steps=5", "eval.every_n_steps=2", "eval.ut_steps=[1,2,3,5]",
         f"data.eval_files=[{eval_file}]").train()
    evals = metrics(tmp_path / "every", split="eval")
    assert sorted(evals) == [2, 4, 5]
    record = evals[5]
    assert {f"eval_loss_step{t}" for t in (1, 2, 3, 5)} <= record.keys()  # T=5 beyond the trained 3
    assert record["eval_loss"] == record["eval_loss_step3"] and record["eval_tokens"] > 0


def test_global_batch_in_tokens(tmp_path, data_cache):
    """2,048 tokens per step = 4 packed rows of 512: micro-batches of 2 need accumulation 2."""
    trainer = make(tmp_path, data_cache, "max_steps=1", "train.global_batch_size=null",
                   "train.global_batch_tokens=2048", "train.micro_batch_size=2")
    assert trainer.grad_accum == 2
    trainer.train()
    assert 0.9 * 2048 < metrics(tmp_path)[1]["tokens"] <= 2048
    with pytest.raises(ValueError, match="not a multiple of data.max_seq_len"):
        make(tmp_path / "bad", data_cache, "train.global_batch_size=null", "train.global_batch_tokens=1000")


def test_resume_between_zero0_and_a_zero_stage_is_refused_before_loading(tmp_path, data_cache):
    """DeepSpeed's universal format converts between ZeRO stages 1-3 only."""
    make(tmp_path, data_cache, "max_steps=1", "deepspeed=zero0").train()
    with pytest.raises(RuntimeError, match="ZeRO stages 1-3 only: resume with deepspeed.zero_stage=0"):
        make(tmp_path, data_cache, "max_steps=2", "deepspeed=zero2")


def test_per_step_losses_every_log_every_steps(tmp_path, data_cache):
    """The per-step losses the objective does not use (all of them for expected_logits) are computed on
    steps 1, 1 + N, ...; the loss is the same on every step whether they are computed or not."""
    make(tmp_path / "every", data_cache, "max_steps=3", "train.log_every=1", "model.checkpointing=none").train()
    make(tmp_path / "sparse", data_cache, "max_steps=3", "train.log_every=2", "model.checkpointing=none").train()
    every, sparse = metrics(tmp_path / "every"), metrics(tmp_path / "sparse")
    assert ["loss_step1" in sparse[step] for step in (1, 2, 3)] == [True, False, True]
    for step in (1, 2, 3):
        assert sparse[step]["loss"] == every[step]["loss"] and "exit_entropy" in sparse[step]
    assert sparse[3]["loss_step3"] == every[3]["loss_step3"]
