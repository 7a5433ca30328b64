"""Resume on another topology: a run checkpointed at step 4 and continued on another number of processes
or ZeRO stage (1, 2, 3) takes the uninterrupted run's steps 5-8 (the global batch is fixed, and an optimizer
step does not depend on how the batch is split), on the same rows. Kills inside a save or a conversion leave
nothing that is picked up, and the same command then resumes.

One 2-process ZeRO-2 run of 8 steps (checkpoints at 4 and 8) is the reference for every test; a 1-process
run of the same recipe records which rows each step trains on and is the source of the 1 -> 2 test, which
continues under ZeRO-3 and is in turn the source of the ZeRO-3 -> 1 process tests.
"""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HANG_GUARD_S, REPO_ROOT
from train_helpers import ENV, compose_run, metrics, run_train
from ouro_train.config import TrainConfig
from ouro_train.data import project_tokenizer
from ouro_train.export.export import export_run
from ouro_train.model import OuroConfig, OuroForCausalLM
from ouro_train.run_dir import (
    RunDir,
    is_complete,
    module_states_file,
    universal_dir,
    universal_tmp_dir,
    zero3_module_states_file,
)
from ouro_train.train import checkpoint, universal
from ouro_train.train.batch import batch_geometry
from ouro_train.train.trainer import Trainer

TIMEOUT = HANG_GUARD_S
RUN = ("max_steps=8", "checkpoint.every_n_steps=4", "checkpoint.keep_last=0", "data.max_seq_len=128",
       "wandb.mode=disabled", "export_at_end=false")


def overrides(output_dir, data_cache, *extra):
    return (f"output_dir={output_dir}", f"data.cache_dir={data_cache}", *RUN, *extra)


class RowRecorder(Trainer):
    """Records the rows each optimizer step trains on, by content (row indices are the code's own)."""

    def _forward(self, mb):
        if not hasattr(self, "rows"):
            self.rows = defaultdict(Counter)
        for row in mb["input_ids"]:
            self.rows[self.state.step + 1][hash(tuple(row.tolist()))] += 1
        return super()._forward(mb)


def rows_of(rows, steps):
    return sum((rows[s] for s in steps), Counter())


def assert_same_trajectory(run_dir, reference_dir, steps=range(5, 9)):
    got, reference = metrics(run_dir), metrics(reference_dir)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step]["supervised_tokens"] == reference[step]["supervised_tokens"], step
        assert math.isclose(got[step]["loss"], reference[step]["loss"], rel_tol=1e-5), (step, got[step], reference[step])
        assert got[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The uninterrupted 2-process ZeRO-2 run."""
    out = tmp_path_factory.mktemp("two-processes")
    run_train(*overrides(out, data_cache, "deepspeed=zero2"), nproc=2, timeout=TIMEOUT)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    """The same run on one process, recording its rows: (output_dir, rows by step)."""
    out = tmp_path_factory.mktemp("one-process")
    trainer = RowRecorder(compose_run(*overrides(out, data_cache, "deepspeed=zero2")))
    trainer.train()
    return out, trainer.rows


def test_one_process_is_the_same_trajectory(reference, single):
    assert_same_trajectory(single[0], reference, steps=range(1, 9))


def test_two_processes_to_one_continues_the_trajectory_on_the_same_rows(reference, single, data_cache, tmp_path,
                                                                        capsys):
    step4 = RunDir(reference).checkpoint(4)
    trainer = RowRecorder(compose_run(*overrides(tmp_path, data_cache, "deepspeed=zero2", f"resume={step4}")))
    assert trainer.state.step == 4
    trainer.train()
    assert_same_trajectory(tmp_path, reference)
    assert rows_of(trainer.rows, range(5, 9)) == rows_of(single[1], range(5, 9))
    log = capsys.readouterr().out
    assert "2 processes, ZeRO-2, this run has 1 processes, ZeRO-2" in log and "RNG streams" in log

    converted = universal_dir(step4)
    assert is_complete(converted) and not universal_tmp_dir(step4).exists()
    made = (converted / "COMPLETE").stat().st_mtime_ns
    universal.ensure_universal(step4)  # a second resume reuses the conversion
    assert (converted / "COMPLETE").stat().st_mtime_ns == made
    # the module states (the whole model's weights under ZeRO-1/2) are stored once under both stages' names
    assert module_states_file(converted).samefile(zero3_module_states_file(converted))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, single, data_cache):
    """The one-process ZeRO-2 run's step 4 continued on two processes under ZeRO-3, saving every step
    (`checkpoint.every_n_minutes`: a tiny interval is due after every step, on both ranks together)."""
    out = tmp_path_factory.mktemp("zero3-two-processes")
    step4 = RunDir(single[0]).checkpoint(4)
    run_train(*overrides(out, data_cache, "deepspeed=zero3", f"resume={step4}", "checkpoint.every_n_minutes=1e-9"),
              nproc=2, timeout=TIMEOUT)
    return out


def test_one_process_zero2_to_two_processes_zero3_continues_the_trajectory_and_saves_on_the_clock(reference, zero3):
    assert_same_trajectory(zero3, reference)
    assert [checkpoint_step.name for checkpoint_step in RunDir(zero3).complete_checkpoints()] == [
        f"step-0000000{s}" for s in range(5, 9)]


def cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam (offload_optimizer) is built for this environment: a C++ extension
    compiled on first use, about 15 minutes on 2 cores, which this file does not pay for. A build made from
    another environment (another virtualenv's paths in its build.ninja) would be rebuilt on first use."""
    import deepspeed
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory, include_paths

    if installed_ops.get("cpu_adam", False):
        return True
    build = Path(_get_build_directory("cpu_adam", False))
    ninja = build / "build.ninja"
    if not ((build / "cpu_adam.so").exists() and ninja.exists()):
        return False
    flags = ninja.read_text()
    return include_paths()[0] in flags and str(Path(deepspeed.__file__).parent) in flags


@pytest.mark.parametrize("target", [
    pytest.param(("deepspeed=zero3",), id="zero3"),
    pytest.param(("deepspeed=zero2",), id="zero2"),
    pytest.param(("deepspeed=zero2", "deepspeed.offload_optimizer=true"), id="zero2-offload_optimizer",
                 marks=pytest.mark.skipif(not cpu_adam_built(), reason="DeepSpeed's CPU Adam is not built")),
])
def test_zero3_two_processes_to_one_continues_the_trajectory(reference, zero3, data_cache, tmp_path, target):
    """ZeRO-3 -> ZeRO-3 on another number of processes, ZeRO-3 -> ZeRO-2 (with its optimizer states offloaded
    to the CPU, DeepSpeed's CPU Adam), from one conversion."""
    step5 = RunDir(zero3).checkpoint(5)
    Trainer(compose_run(*overrides(tmp_path, data_cache, *target, f"resume={step5}"))).train()
    assert_same_trajectory(tmp_path, reference, steps=range(6, 9))


def test_zero2_to_zero1_continues_the_trajectory_on_the_same_rows(single, data_cache, tmp_path):
    step4 = RunDir(single[0]).checkpoint(4)
    trainer = RowRecorder(compose_run(*overrides(tmp_path, data_cache, "deepspeed=zero1", f"resume={step4}")))
    trainer.train()
    assert_same_trajectory(tmp_path, single[0])
    assert rows_of(trainer.rows, range(5, 9)) == rows_of(single[1], range(5, 9))


def test_lora_resumes_from_zero2_under_zero3(data_cache, tmp_path):
    """Adapters and their optimizer states through the universal format; the frozen base is the recipe's
    pretrained one (a random base would not do: ZeRO-3 builds a model partitioned, from other random draws)."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    OuroForCausalLM(OuroConfig(**dict(compose_run().model.config_overrides))).save_pretrained(base)
    project_tokenizer(str(data_cache)).save_pretrained(base)
    lora = ("model.init=pretrained", f"model.path={base}", "lora.enabled=true", "lora.modules_to_save=[early_exit_gate]")
    Trainer(compose_run(*overrides(tmp_path / "straight", data_cache, "deepspeed=zero2", *lora))).train()
    step4 = RunDir(tmp_path / "straight").checkpoint(4)
    resumed = overrides(tmp_path / "resumed", data_cache, "deepspeed=zero3", f"resume={step4}", *lora)
    Trainer(compose_run(*resumed)).train()
    assert_same_trajectory(tmp_path / "resumed", tmp_path / "straight")
    assert is_complete(universal_dir(step4))


def test_a_random_frozen_base_does_not_move_to_or_from_zero3(tmp_path):
    """LoRA / the gate objective on model.init=random rebuild the frozen weights, and ZeRO-3 draws others."""
    (tmp_path / "trainer_state.json").write_text(json.dumps({"world_size": 2, "config": {"deepspeed": {
        "zero_stage": 2, "offload_optimizer": False, "offload_params": False}}}))
    zero3 = checkpoint.Topology(1, 3, False, False)
    assert checkpoint.needs_universal(tmp_path, zero3)
    with pytest.raises(RuntimeError, match="random init .* resume with deepspeed.zero_stage=1 or 2"):
        checkpoint.needs_universal(tmp_path, zero3, random_frozen_base=True)
    assert checkpoint.needs_universal(tmp_path, checkpoint.Topology(1, 1, False, False), random_frozen_base=True)


def kill_at_save(directory: Path, count: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(Path(__file__).with_name("kill_hook.py")), str(directory), str(count),
               "--config-name", "smoke", *args]
    return subprocess.run(command, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def test_a_kill_inside_the_conversion_leaves_nothing_and_the_same_command_resumes(reference, data_cache, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(RunDir(reference).checkpoint(4), source / "step-00000004", ignore=shutil.ignore_patterns("universal*"))
    step4 = source / "step-00000004"
    command = overrides(tmp_path / "run", data_cache, "deepspeed=zero2", f"resume={step4}")
    killed = kill_at_save(universal_tmp_dir(step4), 5, *command)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert universal_tmp_dir(step4).exists() and not universal_dir(step4).exists()

    Trainer(compose_run(*command)).train()
    assert is_complete(universal_dir(step4)) and not universal_tmp_dir(step4).exists()
    assert_same_trajectory(tmp_path / "run", reference)


def test_a_kill_inside_a_save_leaves_nothing_and_the_same_command_resumes(single, data_cache, tmp_path):
    command = overrides(tmp_path, data_cache, "deepspeed=zero2", "checkpoint.every_n_steps=2")
    step4 = RunDir(tmp_path).checkpoint(4)
    killed = kill_at_save(step4, 2, *command)  # after DeepSpeed's first file of the step-4 save
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert step4.is_dir() and not is_complete(step4)
    assert checkpoint.resolve_resume("auto", RunDir(tmp_path)) == RunDir(tmp_path).checkpoint(2)

    Trainer(compose_run(*command)).train()
    assert is_complete(step4)
    assert_same_trajectory(tmp_path, single[0], steps=range(1, 9))


def test_export_reads_the_universal_checkpoint_like_the_original(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("universal*"))
    step4 = RunDir(run).checkpoint(4)
    universal.convert(step4)
    original = load_file(export_run(run, tmp_path / "original", checkpoint=step4, dtype="fp32") / "model.safetensors")
    converted = load_file(export_run(run, tmp_path / "universal", checkpoint=universal_dir(step4), dtype="fp32")
                          / "model.safetensors")
    assert original.keys() == converted.keys()
    for key in original:
        torch.testing.assert_close(converted[key], original[key], rtol=0, atol=0, msg=key)


def test_a_batch_the_new_world_cannot_form_fails_before_anything_is_loaded(reference, data_cache, tmp_path):
    step8 = RunDir(reference).checkpoint(8)
    with pytest.raises(ValueError, match="nearest valid settings: train.global_batch_size=2 or train.global_batch_size=4"):
        Trainer(compose_run(*overrides(tmp_path, tmp_path / "cache", f"resume={step8}", "train.global_batch_size=3")))
    assert not universal_dir(step8).exists() and not (tmp_path / "cache").exists()

    # 128 rows on 48 GPUs with micro-batches of 1 (the example).
    with pytest.raises(ValueError) as e:
        batch_geometry(TrainConfig(micro_batch_size=1, global_batch_size=128), 512, 48)
    assert ("train.global_batch_size=96 or train.global_batch_size=144 on 48 processes; "
            "32 or 64 processes keeping this batch and micro-batch size") in str(e.value)
