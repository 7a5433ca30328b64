"""Export from real DeepSpeed checkpoints: ZeRO-0/1/2 (1 process) and ZeRO-3 (2 processes), full and LoRA.

The reference is what the training engine itself computed on fixed inputs right after saving.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import HANG_GUARD_S, assert_instances_agree
from ouro_train.data import project_tokenizer
from ouro_train.export import ExportError, export_run
from ouro_train.export.cli import main as export_cli
from ouro_train.train.engine import free_port

WRITER = Path(__file__).with_name("ds_run_writer.py")
STAGES = ["zero0", "zero1", "zero2", "zero3"]


def _write_runs(cmd: list, env: dict) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    if proc.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The project tokenizer (1,024 tokens): a 49,152-token vocabulary would make the embedding 98 % of the
    # model and the checkpoints hundreds of MB, and the export path is the same for either.
    root = tmp_path_factory.mktemp("runs")
    tokenizer = root / "tokenizer"
    project_tokenizer(str(root / "cache")).save_pretrained(tokenizer)
    _write_runs([sys.executable, WRITER, root, "--stages", "0", "1", "2", "--tokenizer", tokenizer],
                {"MASTER_PORT": str(free_port())})
    _write_runs([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                 WRITER, root, "--stages", "3", "--tokenizer", tokenizer], {})
    yield root
    shutil.rmtree(root, ignore_errors=True)  # the checkpoints are a few hundred MB


def _reference(run: Path, step: int) -> dict:
    return torch.load(run / "reference" / f"step-{step:08d}.pt")


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model.eval()(ids, use_cache=False).logits


@pytest.mark.parametrize("stage", STAGES)
def test_full_export_reproduces_the_engine(runs, stage, tmp_path):
    run = runs / stage / "full"
    out = export_run(run, tmp_path / "export", dtype="fp32")  # newest complete: step 2 (step 3 is unfinished)
    ref = _reference(run, 2)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_instances_agree(_logits(reloaded, ref["input_ids"]), ref["logits"])  # the engine ran another instance

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    assert config["dtype"] == "float32" and config["total_ut_steps"] == 3 and config["early_exit_threshold"] == 1.0
    assert "auto_map" not in config
    names = set(load_file(out / "model.safetensors"))
    assert "lm_head.weight" in names and "model.layers.1.self_attn.q_proj.weight" in names
    assert not [n for n in names if not (n.startswith("model.") or n == "lm_head.weight")]


@pytest.mark.parametrize("stage", STAGES)
def test_lora_merged_export_equals_base_plus_adapter(runs, stage, tmp_path):
    run = runs / stage / "lora"
    out = export_run(run, tmp_path / "merged", mode="merge", dtype="fp32")
    ref = _reference(run, 2)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged, ref["input_ids"]), ref["logits"], rtol=0, atol=2e-5)
    names = set(load_file(out / "model.safetensors"))
    assert not [n for n in names if "lora" in n or n.startswith("base_model.")]
    # the adapter really changed the weights: the merged model is not the base
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    assert (_logits(base, ref["input_ids"]) - ref["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("stage", STAGES)
def test_adapter_only_export_loads_with_peft(runs, stage, tmp_path):
    run = runs / stage / "lora"
    out = export_run(run, tmp_path / "adapter", mode="adapter_only", dtype="fp32")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run / "base")
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out)
    ref = _reference(run, 2)
    torch.testing.assert_close(_logits(model, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-6)


def test_explicit_checkpoint_and_bf16(runs, tmp_path):
    run = runs / "zero3" / "full"
    fp32 = export_run(run, tmp_path / "fp32", checkpoint=run / "checkpoints" / "step-00000001", dtype="fp32")
    ref = _reference(run, 1)
    assert_instances_agree(_logits(AutoModelForCausalLM.from_pretrained(fp32), ref["input_ids"]), ref["logits"])
    bf16 = export_run(run, tmp_path / "bf16", checkpoint=run / "checkpoints" / "step-00000001", dtype="bf16")
    weights32, weights16 = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert weights16.keys() == weights32.keys()
    for name, tensor in weights16.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, weights32[name].to(torch.bfloat16)), name
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


def test_cli_exports_and_names_what_is_wrong(runs, tmp_path, capsys):
    full, lora = runs / "zero2" / "full", runs / "zero2" / "lora"
    export_cli(["--run", str(lora), "--out", str(tmp_path / "cli"), "--merge"])
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert "exported to" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="needs a LoRA run.*adapter_config.json not found"):
        export_cli(["--run", str(full), "--out", str(tmp_path / "x"), "--merge"])
    with pytest.raises(ExportError, match="is a LoRA run"):
        export_run(lora, tmp_path / "x", mode="full")
    with pytest.raises(SystemExit, match="step-00000003 has no COMPLETE marker"):
        export_cli(["--run", str(full), "--out", str(tmp_path / "x"),
                    "--checkpoint", str(full / "checkpoints" / "step-00000003")])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        export_cli(["--run", str(lora), "--out", str(tmp_path / "cli")])

    random_base = tmp_path / "random-base"
    shutil.copytree(lora / "model", random_base / "model")
    (random_base / "model" / "base_model.json").write_text(json.dumps({"path": None}))
    with pytest.raises(ExportError, match="adapter-only export needs the base model"):
        export_run(random_base, tmp_path / "x", mode="adapter_only")

    incomplete = tmp_path / "incomplete"
    shutil.copytree(full / "model", incomplete / "model")
    shutil.copytree(full / "checkpoints" / "step-00000003", incomplete / "checkpoints" / "step-00000003")
    with pytest.raises(ExportError, match="no complete checkpoint in .*checkpoints"):
        export_run(incomplete, tmp_path / "x")
    assert not (tmp_path / "x").exists()
