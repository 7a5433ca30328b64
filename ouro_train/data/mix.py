"""Mixing: how many rows each source contributes, and which ones. Deterministic given the seed.

Each source asks for a number of rows in one of three ways (or none, meaning `epochs: 1`):
  - `count: N`   exactly N rows;
  - `epochs: E`  round(E x its valid rows);
  - `weight: W`  a share W / (sum of weights) of `data.mix_size` (default: the weighted sources' total
                 size), split with largest remainders so the shares add up exactly.
A target of k rows from a source of n valid rows is drawn as k // n whole passes (each a fresh
permutation) plus k % n rows without replacement; with `replace: true` as k independent draws instead.
Each source's draws come from its own generator seeded by (data.seed, source name), so adding,
removing or reordering other sources does not change them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ouro_train.config import SourceConfig
from ouro_train.data.validate import DataError


@dataclass
class SourcePlan:
    name: str
    domain: str
    available: int  # valid rows
    spec: str  # how the target was asked for
    target: int  # rows drawn into the mix
    mean_tokens: Optional[float] = None  # tokens per row, estimated from a tokenized sample
    with_reasoning: Optional[int] = None  # valid rows with an assistant reasoning trace

    @property
    def epochs(self) -> float:
        return self.target / self.available if self.available else 0.0

    @property
    def tokens(self) -> Optional[float]:
        return None if self.mean_tokens is None else self.mean_tokens * self.target


def plan_mix(sources: Sequence[SourceConfig], available: Sequence[int], mix_size: Optional[int] = None) -> list[SourcePlan]:
    targets: list[Optional[int]] = []
    specs: list[str] = []
    for src, n in zip(sources, available):
        given = [k for k in ("weight", "count", "epochs") if getattr(src, k) is not None]
        if len(given) > 1:
            raise DataError(f"source '{src.name}': set at most one of weight / count / epochs (got {', '.join(given)})")
        kind = given[0] if given else "epochs"
        value = getattr(src, kind) if given else 1.0
        if value < 0:
            raise DataError(f"source '{src.name}': {kind} must be >= 0, got {value}")
        specs.append(f"{kind}={value:g}" + (" (replace)" if src.replace else ""))
        targets.append(None if kind == "weight" else int(value) if kind == "count" else int(round(value * n)))
    weighted = [i for i, t in enumerate(targets) if t is None]
    if weighted:
        weights = np.array([sources[i].weight for i in weighted], dtype=np.float64)
        if weights.sum() <= 0:
            raise DataError("the weights of the weighted sources add up to 0")
        total = mix_size if mix_size is not None else sum(available[i] for i in weighted)
        for i, k in zip(weighted, _largest_remainder(weights / weights.sum() * total)):
            targets[i] = int(k)
    plans = [SourcePlan(s.name, s.domain, n, spec, t) for s, n, spec, t in zip(sources, available, specs, targets)]
    for p in plans:
        if p.target > 0 and p.available == 0:
            raise DataError(f"source '{p.name}': {p.target} rows asked of a source with no valid rows")
    return plans


def draw(n: int, k: int, replace: bool, seed: int, name: str, shuffle: bool = True) -> np.ndarray:
    """k row indices in [0, n) for the source called `name`. `shuffle=False` (data.shuffle) keeps the
    file order: whole passes in order, then the rest (the same rows as shuffled) in order."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if replace:
        picks = rng.integers(0, n, size=k, dtype=np.int64)
        return np.sort(picks) if not shuffle else picks
    passes = [rng.permutation(n) for _ in range(k // n)]
    rest = rng.choice(n, size=k % n, replace=False)
    if not shuffle:
        passes, rest = [np.arange(n)] * len(passes), np.sort(rest)
    return np.concatenate([*passes, rest]).astype(np.int64)


def format_plan(plans: Sequence[SourcePlan]) -> str:
    """The plan as a table: per source (valid rows with and without reasoning), then per domain; tokens
    where a sample was tokenized."""
    total = sum(p.target for p in plans) or 1

    def tokens(items: Sequence[SourcePlan]) -> str:
        known = [p.tokens for p in items if p.tokens is not None]
        return f"{sum(known):>15,.0f}" if len(known) == len(items) else f"{'-':>15}"

    lines = [f"{'source':<28} {'domain':<10} {'available':>11} {'reasoning':>11} {'no reasoning':>12} {'spec':<22} "
             f"{'rows':>11} {'epochs':>7} {'share':>7} {'tokens/row':>10} {'est. tokens':>15}"]
    for p in plans:
        per_row = f"{p.mean_tokens:>10,.0f}" if p.mean_tokens is not None else f"{'-':>10}"
        with_r = f"{p.with_reasoning:>11,} {p.available - p.with_reasoning:>12,}" if p.with_reasoning is not None else f"{'-':>11} {'-':>12}"
        lines.append(f"{p.name:<28} {p.domain:<10} {p.available:>11,} {with_r} {p.spec:<22} {p.target:>11,} "
                     f"{p.epochs:>7.2f} {p.target / total:>7.1%} {per_row} {tokens([p])}")
    lines.append("")
    lines.append(f"{'domain':<28} {'rows':>11} {'share':>7} {'est. tokens':>15}")
    for domain in dict.fromkeys(p.domain for p in plans):
        members = [p for p in plans if p.domain == domain]
        rows = sum(p.target for p in members)
        lines.append(f"{domain:<28} {rows:>11,} {rows / total:>7.1%} {tokens(members)}")
    lines.append(f"{'total':<28} {sum(p.target for p in plans):>11,} {'':>7} {tokens(plans)}")
    return "\n".join(lines)


def _largest_remainder(quotas: np.ndarray) -> np.ndarray:
    """Integers with the same (rounded) total as `quotas`, each within 1 of its quota."""
    base = np.floor(quotas).astype(np.int64)
    short = int(round(quotas.sum())) - int(base.sum())
    order = np.argsort(-(quotas - base), kind="stable")
    base[order[:short]] += 1
    return base
