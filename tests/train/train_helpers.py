"""Helpers for trainer tests: compose a recipe with overrides, run `ouro-train` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from conftest import HANG_GUARD_S, REPO_ROOT, tiny_config
from ouro_train.config import RunConfig, to_object
from ouro_train.train.engine import free_port

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def compose_run(*overrides: str, recipe: str = "smoke") -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "recipes"), version_base="1.3"):
        return to_object(compose(config_name=recipe, overrides=list(overrides)))


def train_command(*overrides: str, recipe: str = "smoke", nproc: int = 1, launcher: str = "torchrun") -> list[str]:
    bin_dir = Path(sys.executable).parent
    args = ["--config-name", recipe, *overrides]
    if nproc == 1:
        return [str(bin_dir / "ouro-train"), *args]
    if launcher == "deepspeed":  # appends --local_rank=N to our arguments
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                "--module", "ouro_train.train", *args]
    return [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "ouro_train.train", *args]


def run_train(*overrides: str, timeout: int = HANG_GUARD_S, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(*overrides, **kwargs), env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"ouro-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(output_dir: Path, split: str = "train") -> dict[int, dict]:
    """step -> the last record of that step (a resumed run logs a redone step again; the later wins)."""
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split", "train") == split:
            out[record["step"]] = record
    return out


def tiny_base_model(tmp_path: Path):
    """A tiny random Ouro saved with the project tokenizer, as a LoRA run's `model.path`:
    (base directory, data cache directory, tokenizer)."""
    import torch

    from ouro_train.data import project_tokenizer
    from ouro_train.model import OuroForCausalLM

    cache = tmp_path / "cache"
    tokenizer = project_tokenizer(str(cache))
    base = tmp_path / "base"
    torch.manual_seed(0)
    OuroForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0,
                                max_position_embeddings=512)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base, cache, tokenizer
