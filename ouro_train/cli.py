"""Console entry points (Hydra over the recipes in `recipes/`).

    ouro-train --config-name smoke|thinking_sft|lora_domain [overrides...]   (also python -m ouro_train.train)
    ouro-prepare --config-name smoke [overrides...] [--plan]

`--config-path DIR` points Hydra at another recipe directory. Launchers that append `--local_rank=N`
(the `deepspeed` launcher) are accepted: the flag is moved into the LOCAL_RANK environment variable
before Hydra parses the command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

import hydra
from omegaconf import DictConfig

from ouro_train.config import REPO_ROOT, ConfigError, to_object


def recipes_dir() -> Optional[str]:
    """The repository's recipes/ (the package is installed editable); None if absent."""
    path = REPO_ROOT / "recipes"
    return str(path) if path.is_dir() else None


def strip_launcher_args(argv: list[str]) -> list[str]:
    """argv without `--local_rank=N` / `--local_rank N` (also `--local-rank`), exporting LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def take_flag(argv: list[str], flag: str) -> bool:
    """Remove a bare `flag` from argv (in place); whether it was there."""
    present = flag in argv
    while flag in argv:
        argv.remove(flag)
    return present


def run_hydra(task: Callable[[DictConfig], None]) -> None:
    """Run `task` as a Hydra app over recipes/, after cleaning sys.argv."""
    sys.argv = strip_launcher_args(sys.argv)
    hydra.main(version_base="1.3", config_path=recipes_dir(), config_name=None)(task)()


def prepare() -> None:
    """ouro-prepare: validate, mix, tokenize and pack the recipe's data into its cache directory."""
    from ouro_train.data import DataError, format_plan, format_summary, load_tokenizer, plan, prepare, split_sources

    show_plan = take_flag(sys.argv, "--plan")

    def task(cfg: DictConfig) -> None:
        try:
            run = to_object(cfg)
            tokenizer = load_tokenizer(run.model, run.data.cache_dir)
            if show_plan:
                for split in ("train", "eval"):
                    if split_sources(run.data, split):
                        print(f"[{split}] mix plan\n{format_plan(plan(run.data, split, tokenizer))}")
                return
            for split in ("train", "eval"):
                if split == "train" or split_sources(run.data, split):
                    prepared = prepare(run.data, tokenizer, split)
                    print(format_summary(prepared.manifest))
        except (DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    run_hydra(task)


def train() -> None:
    """ouro-train: fine-tune an Ouro model with DeepSpeed as the recipe says (`dry_run=true`: the plan)."""

    def task(cfg: DictConfig) -> None:
        from ouro_train.data import DataError
        from ouro_train.train.trainer import StopTraining

        try:
            run = to_object(cfg)
            if run.dry_run:
                from ouro_train.train.plan import compute_plan, format_compute_plan, write_plan

                plan = compute_plan(run)
                print(format_compute_plan(plan))
                print(f"(written to {write_plan(plan, run.output_dir)})")
                return
            _train_and_export(run)
        except (DataError, StopTraining, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    run_hydra(task)


def _train_and_export(run) -> None:
    """Train; after a completed run (not one a signal stopped), rank 0 writes the inference export."""
    import torch.distributed as dist

    from ouro_train.eval.during_training import benchmark_evaluator
    from ouro_train.export import export_run, serving_note
    from ouro_train.export.hf_dir import check_remote_code
    from ouro_train.train.trainer import Trainer

    remote_code = run.export.remote_code if run.export_at_end else None
    if remote_code is not None:
        check_remote_code(Path(remote_code), "export.remote_code")  # before any work
    benchmark = benchmark_evaluator(run)
    trainer = Trainer(run, evaluators=[benchmark] if benchmark else [])
    if trainer.train() and run.export_at_end:
        if trainer.is_main:
            layout = trainer.run_dir
            out = export_run(layout.root, layout.export_dir, mode="merge" if run.lora.enabled else "full",
                             dtype=export_dtype(run), remote_code_dir=remote_code)
            print(f"exported to {out}: {serving_note(layout.root, out, remote_code)}", flush=True)
        dist.barrier()


def export_dtype(run) -> str:
    """`export.dtype` for the export after training: `auto` is the dtype the run trained in."""
    from ouro_train.train.engine import bf16_enabled

    if run.export.dtype.value != "auto":
        return run.export.dtype.value
    return "bf16" if bf16_enabled(run.deepspeed) else "fp32"
