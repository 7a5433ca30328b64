"""`ouro-train ... dry_run=true`: the compute plan of a recipe, without loading weights or data.

Examples come from the sources' `count`s (the thinking mix names every count); a source without a count
is local, and its valid rows are counted with the data pipeline's mix plan (validation only, no
tokenization). Tokens are examples × `plan.tokens_per_example` (an estimate: `ouro-prepare` reports
the real figure and the packing efficiency once the data is prepared).
"""

from __future__ import annotations

import math

from ouro_train.config import RunConfig
from ouro_train.train.batch import batch_geometry, total_steps

PACKING_EFFICIENCY = 0.97  # best-fit packing of long-CoT data into 32K rows; ouro-prepare reports the real one


def compute_plan(cfg: RunConfig) -> dict:
    sources = list(cfg.data.sources)
    examples = sum(s.count for s in sources if s.count is not None)
    if cfg.data.train_files or any(s.count is None for s in sources):
        from ouro_train.data import plan

        examples = sum(p.target for p in plan(cfg.data, "train"))
    tokens_per_epoch = examples * cfg.plan.tokens_per_example
    rows_per_epoch = math.ceil(tokens_per_epoch / (cfg.data.max_seq_len * PACKING_EFFICIENCY))
    geometry = batch_geometry(cfg.train, cfg.data.max_seq_len, cfg.plan.gpus)
    sequences_per_step = geometry.sequences_per_step
    steps = total_steps(cfg.max_steps, cfg.train.epochs, geometry.steps_per_epoch(rows_per_epoch))
    train_tokens = steps * sequences_per_step * cfg.data.max_seq_len * PACKING_EFFICIENCY
    seconds = train_tokens / (cfg.plan.gpus * cfg.plan.tok_per_s_per_gpu)
    return {
        "examples_per_epoch": examples,
        "tokens_per_epoch": tokens_per_epoch,
        "packed_rows_per_epoch": rows_per_epoch,
        "epochs": cfg.train.epochs,
        "sequences_per_step": sequences_per_step,
        "tokens_per_step": sequences_per_step * cfg.data.max_seq_len,
        "optimizer_steps": steps,
        "training_tokens": train_tokens,
        "gpus": cfg.plan.gpus,
        "tok_per_s_per_gpu": cfg.plan.tok_per_s_per_gpu,
        "wall_hours": seconds / 3600,
        "gpu_hours": seconds * cfg.plan.gpus / 3600,
    }


def format_compute_plan(plan: dict) -> str:
    return "\n".join([
        f"examples per epoch    {plan['examples_per_epoch']:>16,}",
        f"tokens per epoch      {plan['tokens_per_epoch']:>16,.0f}   (examples × plan.tokens_per_example)",
        f"packed rows per epoch {plan['packed_rows_per_epoch']:>16,}",
        f"epochs                {plan['epochs']:>16g}",
        f"batch                 {plan['sequences_per_step']:>16,} sequences = {plan['tokens_per_step']:,} tokens",
        f"optimizer steps       {plan['optimizer_steps']:>16,}",
        f"training tokens       {plan['training_tokens']:>16,.0f}",
        f"throughput            {plan['tok_per_s_per_gpu']:>16,.0f} tok/s per GPU × {plan['gpus']} GPUs",
        f"wall time             {plan['wall_hours']:>16,.1f} h   ({plan['gpu_hours']:,.0f} GPU-hours)",
    ])
