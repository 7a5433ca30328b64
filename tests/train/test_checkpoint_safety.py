"""Checkpoints are trusted only as far as they go: no code runs from a checkpoint file (a crafted pickle is
refused, naming the file, on resume and on export), a damaged file in a complete checkpoint is named and
`resume=auto` falls back to the previous complete checkpoint, a full disk is said as such, and the
previous checkpoint stays usable. One in-process run of 6 steps (checkpoints at 2, 4, 6) is the source of
every test; each works on its own copy."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_in_process
from train_helpers import compose_run, metrics
from ouro_train.checkpoint_files import damaged_file
from ouro_train.cli import train
from ouro_train.export.cli import main as export_main
from ouro_train.run_dir import RunDir, is_complete, module_states_file, rank_state_file
from ouro_train.train import checkpoint
from ouro_train.train.trainer import Trainer

RUN = ("max_steps=6", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0", "data.max_seq_len=128",
       "wandb.mode=disabled", "export_at_end=false")
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def overrides(output_dir, data_cache, *extra):
    return (f"output_dir={output_dir}", f"data.cache_dir={data_cache}", *RUN, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("reference")
    Trainer(compose_run(*overrides(out, data_cache))).train()
    return out


def copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to


def ouro_train(monkeypatch, *args) -> int:
    return run_in_process(monkeypatch, train, "--config-name", "smoke", *args)


class Payload:
    """Runs `touch marker` when unpickled: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(file: Path, marker: Path) -> None:
    data = torch.load(file, weights_only=False)  # the test's own file
    data["extra"] = Payload(marker)
    torch.save(data, file)


def same_steps(run: Path, reference: Path, steps) -> None:
    resumed, straight = metrics(run), metrics(reference)
    for step in steps:
        for key in ("loss", "grad_norm", "lr", "supervised_tokens"):
            assert resumed[step][key] == straight[step][key], f"step {step} {key}"


@pytest.mark.parametrize("victim", ["model_states", "optim_states", "rank_state"])
def test_a_crafted_checkpoint_file_is_refused_on_resume(reference, data_cache, tmp_path, monkeypatch, capsys, victim):
    run = copy_run(reference, tmp_path / "run")
    step6 = RunDir(run).checkpoint(6)
    file = {"model_states": module_states_file(step6), "optim_states": step6 / OPTIM_STATES,
            "rank_state": rank_state_file(step6, 0)}[victim]
    marker = tmp_path / "code-ran"
    plant(file, marker)
    status = ouro_train(monkeypatch, *overrides(run, data_cache, "max_steps=8", "resume_allow_changes=[max_steps]"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert not marker.exists(), "the checkpoint's code ran"
    assert status == 1 and last.startswith(f"error: {file}: refused to load: ") and "posix.system" in last, last


@pytest.mark.parametrize("victim", [module_states_file, lambda step: step / OPTIM_STATES])
def test_a_crafted_checkpoint_file_is_refused_on_export(reference, tmp_path, victim):
    run = copy_run(reference, tmp_path / "run")
    file = victim(RunDir(run).checkpoint(6))
    marker = tmp_path / "code-ran"
    plant(file, marker)
    with pytest.raises(SystemExit) as exit_:
        export_main(["--run", str(run), "--out", str(tmp_path / "export")])
    assert not marker.exists(), "the checkpoint's code ran"
    assert str(exit_.value.code).startswith(f"ouro-export: {file}: refused to load: "), exit_.value.code
    assert not (tmp_path / "export").exists()


def test_resume_auto_passes_over_a_truncated_checkpoint(reference, data_cache, tmp_path, monkeypatch, capsys):
    run = copy_run(reference, tmp_path / "run")
    step6 = RunDir(run).checkpoint(6)
    for file in step6.glob("*.pt"):
        os.truncate(file, file.stat().st_size // 2)
    assert is_complete(step6)
    assert ouro_train(monkeypatch, *overrides(run, data_cache)) == 0
    out = capsys.readouterr().out
    assert f"warning: resume=auto passes over {step6}: {step6}/" in out and " is truncated or corrupt (" in out
    assert f"resumed from {RunDir(run).checkpoint(4)} at step 4" in out
    same_steps(run, reference, (5, 6))  # steps 5 and 6 again, as the uninterrupted run took them
    assert damaged_file(step6) is None  # saved again, whole


def test_an_explicit_resume_of_a_damaged_checkpoint_names_the_file(reference, data_cache, tmp_path, monkeypatch,
                                                                    capsys):
    run = copy_run(reference, tmp_path / "run")
    step4 = RunDir(run).checkpoint(4)
    os.truncate(step4 / OPTIM_STATES, 1000)
    status = ouro_train(monkeypatch, *overrides(tmp_path / "new", data_cache, f"resume={step4}"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and last.startswith(f"error: resume={step4}: {step4 / OPTIM_STATES} is truncated or corrupt"), last
    assert not (tmp_path / "new" / "checkpoints").exists()  # before any work


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB file system (tmpfs): room for one of these checkpoints (3.3 MiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_said_and_the_previous_checkpoint_resumes(reference, data_cache, small_disk, monkeypatch,
                                                                  capsys):
    run = small_disk / "run"
    status = ouro_train(monkeypatch, *overrides(run, data_cache))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    step2 = RunDir(run).checkpoint(2)
    needed = sum(f.stat().st_size for f in step2.iterdir() if f.is_file())
    assert status == 1, last
    assert last.startswith(f"error: no space left on {run / 'checkpoints'}: needs ~{needed / 2**20:.1f} MiB "), last
    assert RunDir(run).newest_checkpoint() == step2 and damaged_file(step2) is None

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert ouro_train(monkeypatch, *overrides(run, data_cache)) == 0
    same_steps(run, reference, range(3, 7))


def test_a_disk_that_fills_during_a_save_is_said(reference, data_cache, small_disk, monkeypatch, capsys):
    """The estimate before a save can fall short (another writer): the write's own failure says so too."""
    monkeypatch.setattr(checkpoint, "expected_size", lambda run_dir, engine: 0)
    run = small_disk / "run"
    assert ouro_train(monkeypatch, *overrides(run, data_cache)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on {run / 'checkpoints'}: needs ~"), last
    assert RunDir(run).newest_checkpoint() == RunDir(run).checkpoint(2)
    assert damaged_file(RunDir(run).checkpoint(2)) is None
