"""Ulysses sequence parallelism is exact: 2 processes with parallel.sequence_parallel_size=2 (one row
split between them) and 4 processes with SP=2 × DP=2 take the same three optimizer steps as one
process without SP on the same packed rows (documents crossing the shard boundary, `step+layer`
checkpointing, ZeRO-2): the same losses and the same full gradients before every update. (One process
is the reference for SP=2 × DP=2 too: a step does not depend on how the batch is split over data-parallel
ranks, `test_trainer_steps`.) The SP run's evaluation (run without SP) scores like the reference's, and
its step-2 checkpoint resumes on one process without SP into the reference's step 3. Wrong settings
fail before any work."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANG_GUARD_S, REPO_ROOT
from grad_recorder import GradRecorder
from train_helpers import ENV, compose_run, metrics
from ouro_train.config import ConfigError
from ouro_train.run_dir import RunDir
from ouro_train.train.engine import free_port
from ouro_train.train.trainer import Trainer

TIMEOUT = HANG_GUARD_S
SEQ = 128
# Adam with eps = 1 moves each weight by about lr·g: later steps' gradients see the earlier ones.
RUN = ("max_steps=3", f"data.max_seq_len={SEQ}", "model.checkpointing=step+layer", "deepspeed=zero2",
       "train.micro_batch_size=1", "train.global_batch_size=2", "optim.lr=0.1", "optim.eps=1.0",
       "optim.warmup_steps=0", "checkpoint.every_n_steps=2", "wandb.mode=disabled", "export_at_end=false",
       f"data.eval_files=[{REPO_ROOT / 'data' / 'eval' / 'math_eval.jsonl'}]")


def overrides(output_dir, data_cache, *extra):
    return (f"output_dir={output_dir}", f"data.cache_dir={data_cache}", *RUN, *extra)


def run_recorded(output_dir: Path, data_cache: Path, nproc: int, *extra: str) -> dict:
    record = output_dir / "record.pt"
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               str(Path(__file__).with_name("grad_recorder.py")), str(record),
               *overrides(output_dir, data_cache, *extra)]
    proc = subprocess.run(command, env={**ENV, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}:{REPO_ROOT / 'tests' / 'train'}"},
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(record, weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """One process, no SP: (output_dir, record)."""
    out = tmp_path_factory.mktemp("one-process")
    trainer = GradRecorder(compose_run(*overrides(out, data_cache)))
    trainer.train()
    return out, trainer.record()


def max_relative_differences(got_dir, got, ref_dir, ref) -> tuple[float, float]:
    """(max relative loss difference over the steps, max over steps and tensors of max|Δg| / max|g|)."""
    got_metrics, ref_metrics = metrics(got_dir), metrics(ref_dir)
    assert sorted(got_metrics) == sorted(ref_metrics) == [1, 2, 3]
    loss = 0.0
    for step in (1, 2, 3):
        assert got_metrics[step]["supervised_tokens"] == ref_metrics[step]["supervised_tokens"]
        assert got_metrics[step]["tokens"] == ref_metrics[step]["tokens"]
        loss = max(loss, abs(got_metrics[step]["loss"] - ref_metrics[step]["loss"]) / abs(ref_metrics[step]["loss"]))
    assert len(got["grads"]) == len(ref["grads"]) == 3
    grad = 0.0
    for g_step, r_step in zip(got["grads"], ref["grads"]):
        assert g_step.keys() == r_step.keys()
        for name, r in r_step.items():
            grad = max(grad, ((g_step[name] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return loss, grad


def test_the_rows_have_documents_across_the_shard_boundary(reference):
    _, record = reference
    rows = torch.cat(record["positions"])
    crossing = (rows[:, SEQ // 2] != 0) & ((rows[:, 1:] == 0).any(-1))  # a document spans tokens 63|64
    assert bool(crossing.any()), "the test rows should pack documents across the SP shard boundary"


@pytest.fixture(scope="module")
def sp2(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("sp2")
    return out, run_recorded(out, data_cache, 2, "parallel.sequence_parallel_size=2")


@pytest.mark.parametrize("nproc", [2, 4], ids=["sp2", "sp2xdp2"])
def test_sequence_parallel_takes_the_same_steps(request, tmp_path, data_cache, reference, nproc):
    if nproc == 2:
        out, got = request.getfixturevalue("sp2")
    else:
        out, got = tmp_path, run_recorded(tmp_path, data_cache, nproc, "parallel.sequence_parallel_size=2")
    loss, grad = max_relative_differences(out, got, *reference)
    print(f"SP=2 on {nproc} processes vs 1 process: max rel diff loss {loss:.2e}, gradients {grad:.2e}")
    assert loss <= 1e-5 and grad <= 1e-5, (loss, grad)
    assert math.isclose(metrics(out)[3]["grad_norm"], metrics(reference[0])[3]["grad_norm"], rel_tol=1e-5)


def test_evaluation_during_sp_training_runs_without_sp(sp2, reference):
    """Every rank scores its own eval rows whole; on 2 ranks the eval set's odd last row is left out."""
    got, ref = metrics(sp2[0], split="eval")[3], metrics(reference[0], split="eval")[3]
    assert 0.95 * ref["eval_tokens"] < got["eval_tokens"] <= ref["eval_tokens"]
    assert math.isclose(got["eval_loss"], ref["eval_loss"], rel_tol=0.02)


def test_an_sp_checkpoint_resumes_on_one_process_without_sp(sp2, reference, data_cache, tmp_path):
    step2 = RunDir(sp2[0]).checkpoint(2)
    trainer = Trainer(compose_run(*overrides(tmp_path, data_cache, f"resume={step2}")))
    assert trainer.state.step == 2
    trainer.train()
    got, ref = metrics(tmp_path)[3], metrics(reference[0])[3]
    assert got["supervised_tokens"] == ref["supervised_tokens"]
    assert math.isclose(got["loss"], ref["loss"], rel_tol=1e-5)


# --------------------------------------------------------------------------- wrong settings, no training
@pytest.mark.parametrize("override, message", [
    ("parallel.sequence_parallel_size=0", "parallel.sequence_parallel_size: must be >= 1, got 0"),
    ("parallel.sequence_parallel_size=3", "parallel.sequence_parallel_size: data.max_seq_len=512 does not split into 3"),
])
def test_config_values_are_refused_when_composed(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(override)


class NoWork(Trainer):
    def _prepare(self, split):
        raise AssertionError("data was touched before the sequence-parallel check")


def test_sp_not_dividing_the_processes_or_heads_fails_before_any_work(tmp_path):
    # One process: SP=2 does not divide it.
    with pytest.raises(ConfigError, match="parallel.sequence_parallel_size: 2 does not divide the 1 processes"):
        NoWork(compose_run(f"output_dir={tmp_path}", "parallel.sequence_parallel_size=2"))
    # The smoke model has 4 heads: 8 ranks per row cannot split them (checked with the dry-run plan on 8 GPUs).
    from ouro_train.train.plan import compute_plan

    with pytest.raises(ConfigError, match=r"8 does not divide the model's 4 attention heads.*one of \[1, 2, 4\]"):
        compute_plan(compose_run(f"output_dir={tmp_path}", "parallel.sequence_parallel_size=8", "plan.gpus=8",
                                 "plan.estimate_memory=false", "plan.tok_per_s_per_gpu=1000"))
    with pytest.raises(ConfigError, match="2 does not divide the 3 processes"):
        compute_plan(compose_run(f"output_dir={tmp_path}", "parallel.sequence_parallel_size=2", "plan.gpus=3",
                                 "plan.estimate_memory=false", "plan.tok_per_s_per_gpu=1000"))


# --------------------------------------------------------------------------- cheap: sharding, plan, memory
def test_sharded_labels_give_every_target_of_the_row_once():
    from ouro_train.model.loss import supervised_targets
    from ouro_train.model.sequence_parallel import SequenceParallel

    labels = torch.randint(3, 100, (2, 12))
    labels[:, [0, 5, 8]] = -100
    mask, targets = supervised_targets(labels)
    shards = [supervised_targets(SequenceParallel(None, r, 3).shard_labels(labels)) for r in range(3)]
    assert all(m.shape == (2, 4) for m, _ in shards)  # one predicting position per token of the shard
    assert sum(t.numel() for _, t in shards) == targets.numel()
    per_row = [torch.cat([SequenceParallel(None, r, 3).shard_labels(labels)[b, 1:] for r in range(3)])
               for b in range(2)]
    assert all(torch.equal(row[:11], labels[b, 1:]) and row[11] == -100 for b, row in enumerate(per_row))


def test_plan_and_memory_estimate_account_for_sp(tmp_path):
    from ouro_train.train.plan import compute_plan

    common = (f"output_dir={tmp_path}", "plan.gpus=4", "plan.tok_per_s_per_gpu=1000", "train.global_batch_size=4",
              "train.micro_batch_size=1", f"data.max_seq_len={SEQ}")
    plain = compute_plan(compose_run(*common))
    split = compute_plan(compose_run(*common, "parallel.sequence_parallel_size=2"))
    assert (split["sequence_parallel_size"], split["data_parallel_size"]) == (2, 2)
    assert split["sequences_per_step"] == plain["sequences_per_step"] == 4  # the batch counts rows
    assert split["optimizer_steps"] == plain["optimizer_steps"]
    # One rank of the group holds half the tokens outside attention: well under the whole row's activations.
    ratio = split["memory"]["components"]["activations"] / plain["memory"]["components"]["activations"]
    assert 0.4 < ratio < 0.75, ratio
    assert split["memory"]["components"]["optimizer"] == plain["memory"]["components"]["optimizer"]
