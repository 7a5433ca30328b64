"""Sampling a benchmark the paper's way: N completions per problem, pass@k, per-problem rows that resume.

A *setting* is one way of running the model: T recurrent steps with all of them used for every
token (threshold 1.0), or the trained T with compute-saving early exit at a threshold. For each
(benchmark, setting) the problems are taken in fixed groups of `batch_size // samples` problems (one
problem at a time when N exceeds the batch); a group's N·problems completions are generated in
batches from one `torch.Generator` seeded by (seed, benchmark, setting, first problem), so a group
gives the same completions whether the run was interrupted or not. Every finished problem appends its
N rows (one per sample) to the predictions JSONL; a resumed run skips the groups whose problems are
all there.

pass@k is the unbiased estimator of Chen et al. (2021) averaged over problems,
1 - C(n-c, k) / C(n, k) for n samples of which c are correct; pass@1 is the mean accuracy.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ouro_train.eval.answers import Problem, check_answer
from ouro_train.generation.chat import Completion, GenerationSettings

# conversations, generation settings, seed -> one completion per conversation, in order
Complete = Callable[[list[list[dict]], GenerationSettings, int], list[Completion]]


@dataclass(frozen=True)
class Setting:
    ut_steps: int
    threshold: float = 1.0  # 1.0: every token runs all ut_steps

    @property
    def label(self) -> str:
        return f"T={self.ut_steps}" + ("" if self.threshold >= 1.0 else f" exit={self.threshold:g}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def group_seed(seed: int, benchmark: str, setting: Setting, first_problem: int) -> int:
    return zlib.crc32(f"{seed}/{benchmark}/{setting.label}/{first_problem}".encode())


def read_done(path: Path, samples: int) -> dict[tuple[str, str], list[dict]]:
    """Rows of complete problems in a predictions JSONL, by (benchmark, setting label, problem index):
    rewrites the file without a problem's partial rows or a line cut off by a kill."""
    rows, cut = [], False
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            cut = True  # the last line of a killed run
            break
    by_problem: dict = {}
    for row in rows:
        by_problem.setdefault((row["benchmark"], row["setting"], row["problem"]), []).append(row)
    done = {key: group for key, group in by_problem.items() if len(group) == samples}
    if cut or len(done) * samples != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for group in done.values() for r in group))
    return done


def sample_benchmark(
    complete: Complete,
    benchmark: str,
    problems: Sequence[Problem],
    setting: Setting,
    settings: GenerationSettings,
    samples: int,
    batch_size: int,
    seed: int,
    predictions: Path,
    done: dict,
) -> list[list[dict]]:
    """The rows of every problem (N each, in problem order), generating those not in `done`."""
    settings = replace(settings, ut_steps=setting.ut_steps, exit_threshold=setting.threshold)
    group_size = max(1, batch_size // samples)
    results: list[list[dict] | None] = [done.get((benchmark, setting.label, i)) for i in range(len(problems))]
    bar = tqdm(total=len(problems), initial=sum(r is not None for r in results), desc=f"{benchmark} {setting.label}",
               unit="problem", dynamic_ncols=True)
    tokens = seconds = 0.0
    with bar, open(predictions, "a") as out:
        for first in range(0, len(problems), group_size):
            group = range(first, min(first + group_size, len(problems)))
            if all(results[i] is not None for i in group):
                continue
            start = time.perf_counter()
            chunk_seed = group_seed(seed, benchmark, setting, first)
            completions = complete([problems[i].prompt for i in group for _ in range(samples)], settings, chunk_seed)
            elapsed = time.perf_counter() - start
            per_row = elapsed / len(completions)
            for offset, i in enumerate(group):
                if results[i] is not None:
                    continue
                mine = completions[offset * samples : (offset + 1) * samples]
                results[i] = [_row(benchmark, setting, i, problems[i], j, chunk_seed, c, per_row)
                              for j, c in enumerate(mine)]
                out.writelines(json.dumps(r) + "\n" for r in results[i])
                out.flush()
                bar.update()
            tokens += sum(c.num_tokens for c in completions)
            seconds += elapsed
            finished = [r for r in results if r is not None]
            bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.1f}",
                            acc=f"{np.mean([s['correct'] for rows in finished for s in rows]):.3f}")
    return results


def summarise(results: Sequence[Sequence[dict]], ks: Sequence[int]) -> dict:
    """pass@k (k <= samples), mean recurrent steps per generated token, tokens and tokens/s of a setting."""
    n = len(results[0])
    correct = [sum(r["correct"] for r in rows) for rows in results]
    rows = [r for group in results for r in group]
    tokens = sum(r["tokens"] for r in rows)
    summary = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in sorted(set(ks) | {1}) if k <= n}
    summary.update(
        accuracy=summary["pass@1"],
        problems=len(results),
        samples=n,
        mean_steps=sum(r["mean_steps"] * r["tokens"] for r in rows) / max(tokens, 1),
        tokens=tokens,
        tok_per_s=tokens / max(sum(r["seconds"] for r in rows), 1e-9),
        stopped=float(np.mean([r["stopped"] for r in rows])),
    )
    return summary


def _row(benchmark: str, setting: Setting, index: int, problem: Problem, sample: int, seed: int, c: Completion,
         seconds: float) -> dict:
    verdict = check_answer(c.text, problem.reference, problem.kind)
    return {
        "benchmark": benchmark, "setting": setting.label, "ut_steps": setting.ut_steps,
        "threshold": setting.threshold, "problem": index, "id": problem.id, "sample": sample, "seed": seed,
        "answer": problem.reference, "completion": c.text, "extracted": verdict.extracted, "correct": verdict.correct,
        "tokens": c.num_tokens, "mean_steps": c.mean_steps, "stopped": c.stopped, "seconds": seconds,
    }
