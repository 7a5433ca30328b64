"""Console entry points (Hydra over the recipes in `recipes/`).

    ouro-train --config-name smoke|thinking_sft|lora_domain [overrides...]   (also python -m ouro_train.train)
    ouro-prepare --config-name smoke [overrides...] [--plan]

`--config-path DIR` points Hydra at another recipe directory. Launchers that append `--local_rank=N`
(the `deepspeed` launcher) are accepted: the flag is moved into the LOCAL_RANK environment variable
before Hydra parses the command line.

Before any work, and before torch or transformers is imported (seconds of imports), the command line
is read and the recipe composed and checked: `--help`, a missing `--config-name`, a bad key or value
and an unwritable `output_dir` are answered at once, on one line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ouro_train.config import REPO_ROOT, ConfigError, RunConfig, to_object

# What `--help` lists beside the recipes: the settings most runs change.
COMMON_OVERRIDES = {
    "ouro-train": [
        ("model.path=DIR", "the Ouro checkpoint to start from (model.init=random: a new model)"),
        ("output_dir=DIR", "checkpoints, metrics.jsonl and the export; one run per directory"),
        ("data.train_files=[a.jsonl,...]", "your chat data (data.eval_files: held-out loss)"),
        ("data.cache_dir=DIR", "where the prepared data is kept (share it between runs)"),
        ("max_steps=N", "optimizer steps (else train.epochs over the data)"),
        ("train.global_batch_size=N", "sequences per optimizer step; train.micro_batch_size=N per forward"),
        ("optim.lr=X", "peak learning rate (warmup, then optim.schedule=cosine|linear|wsd|...)"),
        ("lora.enabled=true", "train LoRA adapters instead of all weights"),
        ("deepspeed=zero3", "the ZeRO stage (recipes/deepspeed/*.yaml)"),
        ("resume=auto|none|DIR", "auto: the newest complete checkpoint in output_dir"),
        ("resume_allow_changes=[optim.lr]", "resume although these settings changed (recorded)"),
        ("dry_run=true", "print the compute plan (steps, tokens, memory, time) and exit"),
        ("plan.gpus=N", "the cluster the dry run plans for"),
    ],
    "ouro-prepare": [
        ("--plan", "print the mix plan (rows per source) without tokenizing"),
        ("data.train_files=[a.jsonl,...]", "your chat data (data.eval_files: held-out data)"),
        ("data.cache_dir=DIR", "where the prepared data is written"),
        ("data.max_seq_len=N", "the packed row length"),
        ("model.path=DIR", "whose tokenizer the data is tokenized with"),
    ],
}


def recipes_dir() -> Optional[str]:
    """The repository's recipes/ (the package is installed editable); None if absent."""
    path = REPO_ROOT / "recipes"
    return str(path) if path.is_dir() else None


def recipes(directory: Optional[str]) -> list[tuple[str, str]]:
    """(name, first comment line) of each recipe in `directory`."""
    found = []
    for path in sorted(Path(directory).glob("*.yaml")) if directory else []:
        first = path.read_text().splitlines()[:1]
        found.append((path.stem, first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""))
    return found


def usage(prog: str, directory: Optional[str]) -> str:
    plan = " [--plan]" if prog == "ouro-prepare" else ""
    lines = [f"usage: {prog} --config-name RECIPE [key=value ...]{plan}", "", f"recipes ({directory}):"]
    lines += [f"  {name:<14}{about}" for name, about in recipes(directory)] or ["  (none found)"]
    lines += ["", "common overrides (every setting: ouro_train/config.py; the composed config: --cfg job):"]
    lines += [f"  {flag:<34}{about}" for flag, about in COMMON_OVERRIDES[prog]]
    lines += ["", "--config-path DIR: recipes from another directory; --hydra-help: Hydra's own options"]
    return "\n".join(lines)


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


def fail(message: str, status: int = 1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def checked(cfg: DictConfig) -> RunConfig:
    """The run config, or one line naming the key and exit 1."""
    try:
        return to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def preflight(prog: str, argv: list[str]) -> None:
    """Answer what needs neither Hydra's run directory nor torch: `--help`, no recipe, a config that
    does not compose or check, an `output_dir` that cannot be written (Hydra would create it first)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException

    args = get_args_parser().parse_args(argv[1:])
    directory = recipes_dir()
    if args.config_path is not None:  # Hydra reads it relative to this file's directory
        directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), args.config_path)
    if args.help:
        print(usage(prog, directory))
        sys.exit(0)
    if (args.hydra_help or args.cfg or args.info or args.multirun or args.shell_completion or args.config_dir
            or directory is None):
        return  # Hydra's own pages and modes (and no recipe directory to read)
    if not args.config_name:
        fail(f"no recipe: {prog} --config-name RECIPE, one of "
             f"{', '.join(name for name, _ in recipes(directory)) or '(none found in ' + str(directory) + ')'} "
             f"({prog} --help for the common overrides)", 2)
    names = [name for name, _ in recipes(directory)]
    if names and args.config_name.removesuffix(".yaml") not in names:
        fail(f"no recipe {args.config_name!r} in {directory}: one of {', '.join(names)}", 2)
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=directory, version_base="1.3"):
            cfg = compose(config_name=args.config_name, overrides=overrides)
    except HydraException as e:
        fail(" ".join(str(e).split()))
    run = checked(cfg)
    check_writable(run.output_dir, "output_dir")


def check_writable(directory: str, key: str) -> None:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        fail(f"{key}={directory}: cannot write there ({e.strerror or e})")


def run_hydra(prog: str, task: Callable[[DictConfig], None]) -> None:
    """Run `task` as a Hydra app over recipes/, after cleaning sys.argv and the preflight checks."""
    sys.argv = strip_launcher_args(sys.argv)
    preflight(prog, sys.argv)
    hydra.main(version_base="1.3", config_path=recipes_dir(), config_name=None)(task)()


def prepare() -> None:
    """ouro-prepare: validate, mix, tokenize and pack the recipe's data into its cache directory."""
    show_plan = take_flag(sys.argv, "--plan")

    def task(cfg: DictConfig) -> None:
        run = checked(cfg)
        from ouro_train.data import DataError, format_plan, format_summary, load_tokenizer, plan, prepare, split_sources

        try:
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
            fail(str(e))

    run_hydra("ouro-prepare", task)


def train() -> None:
    """ouro-train: fine-tune an Ouro model with DeepSpeed as the recipe says (`dry_run=true`: the plan)."""

    def task(cfg: DictConfig) -> None:
        run = checked(cfg)
        from ouro_train.data import DataError
        from ouro_train.train.trainer import StopTraining

        try:
            if run.dry_run:
                from ouro_train.train.plan import compute_plan, format_compute_plan, write_plan

                plan = compute_plan(run)
                print(format_compute_plan(plan))
                print(f"(written to {write_plan(plan, run.output_dir)})")
                return
            _train_and_export(run)
        except (DataError, StopTraining, ValueError) as e:
            fail(str(e))

    run_hydra("ouro-train", task)


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
                             dtype=run.export.dtype.value, remote_code_dir=remote_code)
            print(f"exported to {out}: {serving_note(layout.root, out, remote_code)}", flush=True)
        dist.barrier()
