"""Exports read by transformers 4.x, as vLLM builds pinned below 5 and upstream's remote code read them.

These run a second interpreter with transformers 4.x and without ouro-train (`tf4_probe.py`):
    OURO_TF4_PYTHON=/path/to/venv/bin/python    a python with transformers 4.44+ and torch
    OURO_UPSTREAM_CODE=/models/Ouro-1.4B         a downloaded upstream checkpoint (its configuration_ouro.py
                                                 and modeling_ouro.py), for the remote-code test
Each test skips, saying which is missing, where they are not set.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from conftest import HANG_GUARD_S, shared_path, tiny_model
from ouro_train.data import project_tokenizer
from ouro_train.export import export_model
from tf4_probe import MESSAGES

PROBE = Path(__file__).with_name("tf4_probe.py")


def _env_path(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} not set ({what})")
    return value


def _probe(export_dir: Path, out: Path, *args: str) -> dict:
    python = _env_path("OURO_TF4_PYTHON", "a python with transformers 4.x, for the transformers 4 checks")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ouro-train on its path
    proc = subprocess.run([python, str(PROBE), str(export_dir), str(out), *args], env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["transformers"].startswith("4."), result["transformers"]
    return result


@pytest.mark.parametrize("which", ["ouro", "project"])
def test_tokenizer_files_load_in_transformers_4(which, tmp_path):
    if which == "ouro":
        tokenizer, vocab = AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files")), 49152
    else:
        tokenizer = project_tokenizer(str(tmp_path / "cache"))
        vocab = len(tokenizer)
    out = export_model(tiny_model(seed=51, vocab_size=vocab), tmp_path / "export", tokenizer)
    seen = _probe(out, tmp_path / "probe.json")
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert seen["text"] == text
    assert seen["ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert seen["special_tokens"] == tokenizer.all_special_tokens


@torch.no_grad()
def test_merged_dora_export_loads_in_upstream_remote_code(tmp_path):
    upstream = Path(_env_path("OURO_UPSTREAM_CODE", "a downloaded upstream Ouro checkpoint with its remote code"))
    tokenizer = AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                        exclude_modules=["early_exit_gate"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(tiny_model(seed=52, vocab_size=49152), config).eval()
    out = export_model(model, tmp_path / "export", tokenizer, dtype="fp32", remote_code_dir=upstream)
    ids = torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    seen = _probe(out, tmp_path / "probe.json", "--logits-of", str(tmp_path / "ids.json"))
    assert seen["model_class"].endswith("modeling_ouro.OuroForCausalLM")
    upstream_logits = torch.tensor(seen["logits"])
    expected = model(ids, use_cache=False).logits
    print(f"max |Δ| upstream remote code vs base+DoRA adapter: {(upstream_logits - expected).abs().max():.3g}")
    torch.testing.assert_close(upstream_logits, expected, rtol=0, atol=2e-5)
