"""Whole runs through the console scripts: the smoke recipe with its export, and LoRA domain adaptation
under ZeRO-3 with two processes, exported merged and adapter-only."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from train_helpers import ENV, compose_run, metrics, run_train, tiny_base_model
from ouro_train.data import MicroBatchLoader, prepare
from ouro_train.eval import evaluate_loss_per_step
from ouro_train.export.cli import main as export_cli
from ouro_train.model import OuroForCausalLM


def test_smoke_recipe_trains_and_exports(tmp_path):
    run_train(f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "wandb.mode=offline")
    records = metrics(tmp_path)
    assert len(records) == 120
    start = sum(records[s]["loss"] for s in (1, 2, 3)) / 3
    end = sum(records[s]["loss"] for s in (118, 119, 120)) / 3
    assert end < start - 1.0, (start, end)
    export = tmp_path / "export"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in export.iterdir()}
    assert 2 in json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(export)
    assert isinstance(model, OuroForCausalLM) and model.config.total_ut_steps == 3
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # wandb's offline run on rank 0


def _eval_loss(model, cfg, tokenizer, world: int = 2) -> float:
    """Final-step eval loss over the eval rows as `world` ranks see them (each drops its remainder)."""
    data = prepare(cfg.data, tokenizer, "eval", log=lambda _: None)
    batches = [mb for rank in range(world) for mb in MicroBatchLoader(
        data, cfg.train.micro_batch_size, rank=rank, world_size=world, shuffle=False)]
    steps = model.config.total_ut_steps
    return evaluate_loss_per_step(model, batches, [steps])["per_step"][0]["loss"]


def test_lora_under_zero3_two_processes_exports_the_trained_model(tmp_path):
    base, cache, tokenizer = tiny_base_model(tmp_path)
    rows = (REPO_ROOT / "data" / "samples" / "chat.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[24:]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:24]) + "\n")
    overrides = [f"model.path={base}", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
                 f"data.eval_files=[{tmp_path / 'eval.jsonl'}]", f"data.cache_dir={cache}", "data.max_seq_len=512",
                 "max_steps=6", "train.global_batch_size=4", "eval.every_n_steps=6", "optim.lr=2e-2",
                 "optim.warmup_ratio=0", "deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=0",
                 "wandb.mode=disabled"]
    run = tmp_path / "run"
    run_train(f"output_dir={run}", *overrides, recipe="lora_domain", nproc=2)

    trained_eval = metrics(run, split="eval")[6]["eval_loss"]
    cfg = compose_run(f"output_dir={run}", *overrides, recipe="lora_domain")
    base_eval = _eval_loss(AutoModelForCausalLM.from_pretrained(base), cfg, tokenizer)
    assert abs(trained_eval - base_eval) > 1e-2  # the adapter changed the model

    merged = tmp_path / "merged"
    cli = [str(Path(sys.executable).parent / "ouro-export"), "--run", str(run)]
    subprocess.run([*cli, "--out", str(merged), "--merge", "--dtype", "fp32"], check=True, env=ENV)
    merged_eval = _eval_loss(AutoModelForCausalLM.from_pretrained(merged), cfg, tokenizer)
    assert abs(merged_eval - trained_eval) < 1e-4, (merged_eval, trained_eval)
    assert (run / "export" / "model.safetensors").exists()  # export_at_end (merged, bf16)

    adapter = tmp_path / "adapter"
    export_cli(["--run", str(run), "--out", str(adapter), "--adapter-only"])  # the console script's code, in-process
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.numel() > 0 for w in weights.values())
    assert any(w.abs().sum() > 0 for w in lora_b)  # trained, not the zero init (nor empty ZeRO-3 shards)
