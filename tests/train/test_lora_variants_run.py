"""One short DoRA run through `ouro-train` with the other variants' switches on (rsLoRA, all-linear,
LoRA+): it trains, resumes bit for bit, and its end-of-run export with upstream's remote code is the one
`ouro-export --remote-code` writes; merged equals base + adapter as peft computes it."""

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from train_helpers import metrics, run_train, tiny_base_model
from ouro_train.export import export_run
from ouro_train.export.cli import main as export_cli
from ouro_train.run_dir import checkpoint_tag


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@torch.no_grad()
def test_dora_run_trains_resumes_and_exports_for_every_loader(tmp_path):
    base, cache, tokenizer = tiny_base_model(tmp_path)
    upstream = tmp_path / "upstream"  # stands in for a downloaded upstream checkpoint
    upstream.mkdir()
    for name in ("configuration_ouro.py", "modeling_ouro.py"):
        (upstream / name).write_text(f"# upstream {name}\n")
    overrides = [f"model.path={base}", f"data.train_files=[{REPO_ROOT / 'data' / 'samples' / 'chat.jsonl'}]",
                 f"data.cache_dir={cache}", "data.max_seq_len=256", "train.global_batch_size=2", "max_steps=4",
                 "checkpoint.every_n_steps=2", "checkpoint.keep_last=0", "optim.lr=1e-2", "optim.warmup_ratio=0",
                 "lora.r=4", "lora.dropout=0.0", "lora.use_dora=true", "lora.use_rslora=true",
                 "lora.target_modules=all-linear", "lora.loraplus_lr_ratio=4", "lora.modules_to_save=[early_exit_gate]",
                 "deepspeed=zero2", "wandb.mode=disabled"]
    run = tmp_path / "run"
    proc = run_train(f"output_dir={run}", *overrides, f"export.remote_code={upstream}", recipe="lora_domain")
    assert f"exported to {run / 'export'}: loads in ouro-train, upstream's remote code and vLLM" in proc.stdout
    straight = metrics(run)
    assert straight[4]["loss"] < straight[1]["loss"]

    resumed = tmp_path / "resumed"  # the same run stopped after its step-2 checkpoint
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns(checkpoint_tag(4), "export"))
    proc = run_train(f"output_dir={resumed}", *overrides, "export_at_end=false", recipe="lora_domain")
    assert "resumed from" in proc.stdout
    again = metrics(resumed)
    for step in (3, 4):  # bitwise, as in test_train_cli: the same kernels on the same values in the engine's buffers
        assert (again[step]["loss"], again[step]["grad_norm"]) == (straight[step]["loss"], straight[step]["grad_norm"])

    by_cli = tmp_path / "by_cli"
    export_cli(["--run", str(run), "--out", str(by_cli), "--remote-code", str(upstream)])
    _same_files(run / "export", by_cli)
    card = (run / "export" / "README.md").read_text()
    tokens = sum(record["tokens"] for record in straight.values())
    assert f"- Base model: `{base}`" in card and f"Steps trained: 4, tokens: {tokens:,}." in card
    assert "| `lora.use_dora` | `true` |" in card and "| `lora.loraplus_lr_ratio` | `4.0` |" in card
    chat_rows = (REPO_ROOT / "data" / "samples" / "chat.jsonl").read_text().count("\n")
    assert f"| chat | general | epochs=1 | {chat_rows:,} |" in card  # every sample conversation, once
    logged = max(step for step, record in straight.items() if "loss_step1" in record)  # train.log_every
    losses = " | ".join(f"{straight[logged][f'loss_step{t}']:.4f}" for t in (1, 2, 3))
    assert f"| train (step {logged}) | {losses} |" in card

    merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "merged", dtype="fp32")).eval()
    adapter = export_run(run, tmp_path / "adapter", mode="adapter_only", dtype="fp32")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.randint(3, len(tokenizer), (2, 16))
    expected = with_adapter(ids).logits
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=2e-5)
    with with_adapter.disable_adapter():
        assert (with_adapter(ids).logits - expected).abs().max() > 1e-3  # the adapter was trained
