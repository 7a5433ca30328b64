"""Run settings as a user types them: grad_norm under every ZeRO stage, data.shuffle=false and
data.val_size in a run, export.dtype in the export after training, and the sft recipe."""

import json
import math

import pytest
from safetensors import safe_open

from train_helpers import compose_run, metrics
from conftest import REPO_ROOT, run_in_process
from ouro_train.cli import train as train_cli
from ouro_train.run_dir import RunDir
from ouro_train.train.trainer import Trainer

DEMO = REPO_ROOT / "tests" / "data" / "llamafactory_demo"


def overrides(tmp_path, data_cache, *extra):
    return (f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled", "export_at_end=false",
            *extra)


def test_grad_norm_is_logged_under_every_zero_stage(tmp_path, data_cache):
    """ZeRO-0 trains in fp32 here, where DeepSpeed clips without keeping the norm; ZeRO-0 and -1 must log the
    norm of the same first gradient that DeepSpeed's ZeRO-2 partitions compute. (A random model built under
    ZeRO-3 is initialised partitioned, so its first step starts from other weights: its norm is only checked
    to be there.)"""
    norms = {}
    for stage in ("zero0", "zero1", "zero2", "zero3"):
        Trainer(compose_run(*overrides(tmp_path / stage, data_cache, "max_steps=1", f"deepspeed={stage}"))).train()
        norms[stage] = metrics(tmp_path / stage)[1]["grad_norm"]
    assert all(isinstance(v, float) and v > 0 for v in norms.values()), norms
    for stage in ("zero0", "zero1"):
        assert math.isclose(norms[stage], norms["zero2"], rel_tol=1e-5), norms


class RowRecorder(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.rows = []

    def _forward(self, mb):
        self.rows += [ids[ids != 0].tolist() for ids in mb["input_ids"]]  # pad id 0 never occurs inside a row here
        return super()._forward(mb)


def test_unshuffled_rows_in_order_and_a_held_out_eval_split(tmp_path, data_cache):
    cfg = compose_run(*overrides(tmp_path, data_cache, "max_steps=2", "data.shuffle=false", "data.pack=false",
                                 "data.val_size=6", "eval.every_n_steps=0"))
    trainer = RowRecorder(cfg)
    trainer.train()
    stored = [trainer.train_data[r][0].tolist() for r in range(8)]
    assert trainer.rows == stored  # 2 steps x 4 rows, in stored (file) order
    assert len(trainer.eval_data) == 6
    # each sample file has 300 valid rows (on_bad_row=error): every one is on exactly one side
    held = {name: v["available"] for name, v in trainer.eval_data.manifest["sources"].items()}
    assert sum(held.values()) == 6
    assert all(v["available"] + held[name] == 300 for name, v in trainer.train_data.manifest["sources"].items())
    evaluation = metrics(tmp_path, "eval")[2]
    assert evaluation["eval_tokens"] == sum(int(trainer.eval_data[r][1].sum()) for r in range(6))  # its targets


@pytest.mark.parametrize("dtype, expected", [("auto", "float32"), ("bf16", "bfloat16")])
def test_export_dtype_is_used_by_the_export_after_training(tmp_path, data_cache, monkeypatch, dtype, expected):
    """auto: the dtype the run trained in (fp32 here, on the CPU)."""
    args = ["--config-name", "smoke", f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled",
            "max_steps=1", f"export.dtype={dtype}"]
    assert run_in_process(monkeypatch, train_cli, *args) == 0
    export = tmp_path / "export"
    assert json.loads((export / "config.json").read_text())["dtype"] == expected
    with safe_open(export / "model.safetensors", "pt") as f:
        assert str(f.get_tensor("lm_head.weight").dtype) == f"torch.{expected}"


def test_sft_recipe_is_full_fine_tuning_with_the_expected_defaults():
    run = compose_run("model.path=/models/Ouro-1.4B", "data.train_files=[a.jsonl]", recipe="sft")
    assert not run.lora.enabled and run.model.checkpointing.value == "auto"
    assert run.data.pack and run.optim.schedule.value == "cosine" and run.optim.warmup_ratio > 0
    assert run.export.dtype.value == "auto"


def test_sft_recipe_trains_a_base_on_a_llamafactory_dataset_info(tmp_path, monkeypatch):
    """The sft recipe as a LLaMA-Factory user launches it: a dataset_info.json, a held-out split, the
    LLaMA-Factory supervision, a wsd schedule; it trains, evaluates and exports in the dtype trained."""
    from train_helpers import tiny_base_model

    base, cache, _ = tiny_base_model(tmp_path)
    out = tmp_path / "run"
    args = ["--config-name", "sft", f"model.path={base}", f"output_dir={out}", f"data.cache_dir={cache}",
            f"data.dataset_info={DEMO}/dataset_info.json", "data.datasets=[identity,alpaca_en_demo,thinking_demo]",
            "data.val_size=2", "data.mask_turn_end=false", "data.max_seq_len=256", "data.pack=false", "optim.schedule=wsd",
            "optim.warmup_ratio=0", "train.global_batch_size=2", "train.epochs=1", "deepspeed=zero0",
            "wandb.mode=disabled"]
    assert run_in_process(monkeypatch, train_cli, *args) == 0
    records = metrics(out)
    assert set(records) == {1, 2} and all(r["grad_norm"] is not None for r in records.values())  # 5 rows, 2 a step
    assert "eval_loss" in metrics(out, "eval")[2]
    assert json.loads((out / "export" / "config.json").read_text())["dtype"] == "float32"
    manifest = json.loads(RunDir(out).data_manifest_file.read_text())
    assert manifest["mask_turn_end"] is False and manifest["num_documents"] == 5
    assert set(manifest["sources"]) == {"identity", "alpaca_en_demo", "thinking_demo"}
