"""Shared test helpers: the `../shared` reference folder (skipped with a reason where absent) and tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

# Under pytest-xdist the workers share the cores: more intra-op threads than cores makes the tiny models'
# many small kernels much slower, not faster.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
# Every subprocess a test starts is bounded by this: a guard against a hang, never a speed limit (a busy
# 2-core CI machine may take many times a quiet one's time).
HANG_GUARD_S = 1800


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """A data cache directory for one test file: its runs build the project tokenizer and data once."""
    return tmp_path_factory.mktemp("data-cache")


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test: a user's clone has no ../shared (CI always has it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (reference files live in ../shared beside the repository)")
    return path


def tiny_config(**overrides):
    from ouro_train import OuroConfig

    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        total_ut_steps=3,
        rope_theta=10000.0,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return OuroConfig(**values)


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random Ouro with norms and exit gate moved away from their initial values."""
    from ouro_train import OuroForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    model = OuroForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "early_exit_gate" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


# Two model instances with bitwise-equal weights may still differ by a few float32 ulps: CPU kernels pick
# vector paths by the alignment of each allocation. Compare them with this; keep bitwise equality for the
# same weights in the same memory running the same kernels.
INSTANCE_TOLERANCE = dict(rtol=0.0, atol=1e-6)


def assert_instances_agree(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **INSTANCE_TOLERANCE)


def run_in_process(monkeypatch, entry_point, *args: str) -> int:
    """A console script's entry point run in this process with `args` as its command line; its exit status.

    It takes the command's own path (Hydra, the config checks, the one-line error) without the ~10 s of
    imports every new process pays. Each script keeps one real subprocess test for the process boundary."""
    hydra_quiet = ("hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null")
    monkeypatch.setattr(sys, "argv", [entry_point.__name__, *args, *hydra_quiet])
    try:
        entry_point()
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return 0
