"""`ouro-train ... dry_run=true`: the compute plan of a recipe, without loading weights or data.

Training data that is all local files is counted (`data/counts.py`: the prepared cache's exact rows and
tokens when it exists, else every valid row counted and a sample of each source tokenized). Otherwise
examples come from the sources' `count`s (the thinking mix names every count), and tokens are examples ×
`plan.tokens_per_example` (an estimate: `ouro-prepare` reports the real figure once the data is prepared).

Memory per GPU and executed FLOPs per token: `train/memory.py` (one step traced on fake tensors for
every checkpointing policy + ZeRO's partitioning of the model states), for `plan.gpus` ranks; the plan
lists each policy's peak and executed ÷ model FLOPs, and `auto` takes the cheapest that fits. With
`parallel.sequence_parallel_size=N` the batch counts rows over plan.gpus / N data-parallel groups, each
GPU holds S/N tokens of its row (attention: all S for H/N heads), and ZeRO still partitions over all
plan.gpus. Time: tokens per second per GPU = the GPU's bf16 peak × the hardware FLOPs utilization of
the last recorded benchmark (`bench/results/*.json`) ÷ the executed FLOPs per token of this
configuration (the traced count; the closed form of `model/flops.py` without the trace). The whole
plan is written to `output_dir/plan.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ouro_train.config import REPO_ROOT, RunConfig
from ouro_train.model.flops import hardware_flops_per_token, peak_bf16_flops, training_flops_per_token
from ouro_train.train import memory, trainable
from ouro_train.train.batch import batch_geometry, total_steps
from ouro_train.train.engine import check_sequence_parallel

PACKING_EFFICIENCY = 0.97  # best-fit packing of long-CoT data into 32K rows; ouro-prepare reports the real one
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def compute_plan(cfg: RunConfig) -> dict:
    local = _count_local_data(cfg)
    if local is not None:
        examples, tokens_per_epoch, rows_per_epoch, basis = local.examples, local.tokens, local.rows, local.basis
    else:
        sources = list(cfg.data.sources)
        examples = sum(s.count for s in sources if s.count is not None)
        if cfg.data.train_files or any(s.count is None for s in sources):
            from ouro_train.data import plan

            examples = sum(p.target for p in plan(cfg.data, "train"))
        tokens_per_epoch = examples * cfg.plan.tokens_per_example
        rows_per_epoch = math.ceil(tokens_per_epoch / (cfg.data.max_seq_len * PACKING_EFFICIENCY))
        basis = "examples × plan.tokens_per_example"
    sp = cfg.parallel.sequence_parallel_size
    config = trainable.architecture(cfg, planning=True)
    if sp > 1:
        check_sequence_parallel(sp, cfg.plan.gpus, config.num_attention_heads, config.num_key_value_heads)
    geometry = batch_geometry(cfg.train, cfg.data.max_seq_len, cfg.plan.gpus // sp)
    sequences_per_step = geometry.sequences_per_step
    steps = total_steps(cfg.max_steps, cfg.train.epochs, geometry, rows_per_epoch)
    train_tokens = steps * sequences_per_step * cfg.data.max_seq_len * PACKING_EFFICIENCY

    checkpointing = cfg.model.checkpointing.value
    table = memory.policy_table(cfg, config, cfg.plan.gpus) if cfg.plan.estimate_memory else None
    if table is not None and checkpointing == "auto":
        checkpointing = memory.choose_checkpointing(table, cfg.plan.gpu_memory_gib)
    if table is not None:
        executed = table[checkpointing]["executed_flops_per_token"]
    else:  # the closed form; `auto` unresolved without the trace: timed as if nothing were recomputed
        executed = hardware_flops_per_token(config, cfg.data.max_seq_len,
                                            "none" if checkpointing == "auto" else checkpointing)
    time = time_plan(cfg, config, executed)
    seconds = train_tokens / (cfg.plan.gpus * time["tok_per_s_per_gpu"])
    plan = {
        "examples_per_epoch": examples,
        "tokens_per_epoch": tokens_per_epoch,
        "tokens_basis": basis,
        "packed_rows_per_epoch": rows_per_epoch,
        "epochs": cfg.train.epochs,
        "sequences_per_step": sequences_per_step,
        "tokens_per_step": sequences_per_step * cfg.data.max_seq_len,
        "optimizer_steps": steps,
        "training_tokens": train_tokens,
        "gpus": cfg.plan.gpus,
        "sequence_parallel_size": sp,
        "data_parallel_size": cfg.plan.gpus // sp,
        "checkpointing": checkpointing,
        "checkpointing_requested": cfg.model.checkpointing.value,
        "time": dict(time, wall_hours=seconds / 3600, gpu_hours=seconds * cfg.plan.gpus / 3600),
    }
    if table is not None:
        plan["policies"] = {policy: policy_row(row, cfg.plan.gpu_memory_gib) for policy, row in table.items()}
    if cfg.plan.estimate_memory:
        plan["memory"] = memory_plan(cfg, config, checkpointing, table[checkpointing])
    return plan


def _count_local_data(cfg: RunConfig):
    """Examples, tokens and rows of training data that is all local files (None: a hub source)."""
    from ouro_train.data import load_tokenizer
    from ouro_train.data.counts import count_local_train_data

    if any(s.path is None for s in cfg.data.sources):
        return None
    return count_local_train_data(cfg.data, load_tokenizer(cfg.model, cfg.data.cache_dir), PACKING_EFFICIENCY)


def policy_row(row: dict, gpu_gib: float) -> dict:
    return {
        "peak_gib": row["peak"] / memory.GIB,
        "model_flops_per_token": row["model_flops_per_token"],
        "executed_flops_per_token": row["executed_flops_per_token"],
        "executed_over_model_flops": row["executed_flops_per_token"] / row["model_flops_per_token"],
        "fits": memory.fits(row["peak"], gpu_gib),
    }


def memory_plan(cfg: RunConfig, config, checkpointing: str, estimate: dict) -> dict:
    longest = memory.longest_seq_len(config, cfg, checkpointing, cfg.plan.gpus, cfg.plan.gpu_memory_gib, estimate)
    positions = config.max_position_embeddings  # no longer rows than the model has positions, whatever fits
    return {
        "peak_gib": estimate["peak"] / memory.GIB,
        "components": {k: estimate[k] / memory.GIB for k in memory.COMPONENTS},
        "fits": {card: memory.fits(estimate["peak"], gib) for card, gib in memory.CARDS_GIB.items()},
        "gpu_memory_gib": cfg.plan.gpu_memory_gib,
        "longest_max_seq_len": min(longest, positions),
        "longest_is_position_limit": longest > positions,
    }


def time_plan(cfg: RunConfig, config, hardware_flops: float) -> dict:
    """Tokens per second per GPU: `plan.tok_per_s_per_gpu` when given, else from the FLOPs executed
    per token (`hardware_flops`: recomputation included)."""
    seq = cfg.data.max_seq_len
    model_flops = training_flops_per_token(config, seq)
    if cfg.plan.tok_per_s_per_gpu is not None:
        return {"tok_per_s_per_gpu": cfg.plan.tok_per_s_per_gpu, "source": "plan.tok_per_s_per_gpu"}
    peak = peak_bf16_flops(cfg.plan.gpu)
    if peak is None:
        raise ValueError(f"plan.gpu: no bf16 peak known for {cfg.plan.gpu!r} (ouro_train.model.flops)")
    if cfg.plan.mfu is not None:
        # An MFU given for this configuration: its recomputation is part of what it measured.
        hfu, source = cfg.plan.mfu * hardware_flops / model_flops, "plan.mfu"
    else:
        hfu, source = recorded_hardware_utilization(config, seq)
    return {
        "tok_per_s_per_gpu": hfu * peak / hardware_flops,
        "model_flops_per_token": model_flops,
        "hardware_flops_per_token": hardware_flops,
        "hardware_flops_utilization": hfu,
        "mfu": hfu * model_flops / hardware_flops,
        "peak_flops": peak,
        "source": source,
    }


def recorded_hardware_utilization(config, seq: int, results_dir: Path = RESULTS_DIR) -> tuple[float, str]:
    """Hardware FLOPs utilization of the newest recorded benchmark row nearest to `seq` tokens, with
    the recomputation of that row's checkpointing counted, and where it comes from."""
    records = [(json.loads(p.read_text()), p.name) for p in sorted(results_dir.glob("*.json"))]
    records = [(r, name) for r, name in records if _measured(r)]
    if not records:
        raise ValueError(f"no measured MFU in {results_dir}: set plan.mfu or plan.tok_per_s_per_gpu")
    record, name = max(records, key=lambda r: r[0]["date"])
    row = min(_measured(record), key=lambda r: abs(r["seq"] - seq))
    utilization = row["mfu"] * hardware_flops_per_token(config, row["seq"], row["checkpointing"]) \
        / training_flops_per_token(config, row["seq"])
    return utilization, f"{name}: {record['device']}, {record['date']}, {row['variant']} at {row['seq']:,} tokens"


def _measured(record: dict) -> list[dict]:
    return [r for r in record.get("results", []) if r.get("mfu")]  # other bench records (e.g. block_mask.json) hold none


def write_plan(plan: dict, output_dir: str) -> Path:
    path = Path(output_dir, "plan.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


def format_compute_plan(plan: dict) -> str:
    t = plan["time"]
    lines = [
        f"examples per epoch    {plan['examples_per_epoch']:>16,}",
        f"tokens per epoch      {plan['tokens_per_epoch']:>16,.0f}   ({plan.get('tokens_basis', 'examples × plan.tokens_per_example')})",
        f"packed rows per epoch {plan['packed_rows_per_epoch']:>16,}",
        f"epochs                {plan['epochs']:>16g}",
        f"batch                 {plan['sequences_per_step']:>16,} sequences = {plan['tokens_per_step']:,} tokens",
        f"optimizer steps       {plan['optimizer_steps']:>16,}",
        f"training tokens       {plan['training_tokens']:>16,.0f}",
        f"checkpointing         {plan['checkpointing']:>16}"
        + ("   (auto: the fewest executed FLOPs that fit)" if plan.get("checkpointing_requested") == "auto"
           and plan["checkpointing"] != "auto" else "")
        + ("   (not resolved without plan.estimate_memory; timed without recomputation)"
           if plan["checkpointing"] == "auto" else ""),
        *([f"sequence parallel     {plan['sequence_parallel_size']:>16}   ranks per row "
           f"({plan['data_parallel_size']} data-parallel groups; S/{plan['sequence_parallel_size']} tokens per GPU "
           "outside attention)"] if plan.get("sequence_parallel_size", 1) > 1 else []),
        f"throughput            {t['tok_per_s_per_gpu']:>16,.0f} tok/s per GPU × {plan['gpus']} GPUs",
    ]
    if "mfu" in t:
        lines.append(f"                      {'':>16}   MFU {t['mfu']:.1%} (HFU {t['hardware_flops_utilization']:.1%}:"
                     f" executed FLOPs) × {t['peak_flops'] / 1e12:,.0f} TFLOP/s; from {t['source']}")
    lines.append(f"wall time             {t['wall_hours']:>16,.1f} h   ({t['gpu_hours']:,.0f} GPU-hours)")
    if "policies" in plan:
        lines += ["", format_policies(plan)]
    if "memory" in plan:
        lines += ["", format_memory(plan["memory"], plan["gpus"])]
    return "\n".join(lines)


def format_policies(plan: dict) -> str:
    lines = ["checkpointing policies (per GPU; FLOPs per token: model = MFU's count, executed = traced)",
             f"  {'policy':<14}{'peak GiB':>9}{'model GFLOP':>13}{'executed GFLOP':>16}{'ratio':>8}  fits"]
    for policy, row in plan["policies"].items():
        mark = "  <- chosen" if policy == plan["checkpointing"] else ""
        lines.append(f"  {policy:<14}{row['peak_gib']:>9.2f}{row['model_flops_per_token'] / 1e9:>13.2f}"
                     f"{row['executed_flops_per_token'] / 1e9:>16.2f}{row['executed_over_model_flops']:>8.3f}"
                     f"  {'yes' if row['fits'] else 'no'}{mark}")
    return "\n".join(lines)


def format_memory(m: dict, gpus: int) -> str:
    lines = [f"peak memory per GPU ({gpus} ranks), GiB"]
    lines += [f"  {name:<20}{gib:>8.2f}" for name, gib in m["components"].items()]
    lines.append(f"  {'peak':<20}{m['peak_gib']:>8.2f}   (+{memory.CONTEXT_RESERVE_GIB} GiB CUDA context, not in the peak)")
    lines.append("fits on " + "   ".join(f"{card}: {'yes' if ok else 'no'}" for card, ok in m["fits"].items()))
    lines.append(f"longest max_seq_len on {m['gpu_memory_gib']:g} GiB: {m['longest_max_seq_len']:,}"
                 + ("   (the model's max_position_embeddings; the memory holds more)"
                    if m.get("longest_is_position_limit") else ""))
    return "\n".join(lines)
