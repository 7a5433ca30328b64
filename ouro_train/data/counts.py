"""How much local training data a recipe has, for the compute plan (`dry_run=true`): exact from the
prepared cache when the data was prepared with these settings, else counted from the files (every valid
row counted, up to 256 rows of each source tokenized for its mean length)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ouro_train.config import DataConfig
from ouro_train.data.cache import cache_key
from ouro_train.data.pipeline import plan, split_sources
from ouro_train.data.tokenizer import tokenizer_hash


@dataclass(frozen=True)
class DataCount:
    examples: int  # conversations in one epoch of the mix
    tokens: float
    rows: int  # rows of data.max_seq_len (packed, or one conversation each)
    basis: str  # where the figures come from


def count_local_train_data(data: DataConfig, tokenizer, packing_efficiency: float) -> DataCount | None:
    """None when a training source is not a local file (a hub dataset is not read for a plan)."""
    sources = split_sources(data, "train")
    if not sources or any(s.path is None for s in sources):
        return None
    prepared = Path(data.cache_dir) / f"train-{cache_key('train', sources, data, tokenizer_hash(tokenizer))}"
    if (prepared / "manifest.json").is_file():
        m = json.loads((prepared / "manifest.json").read_text())
        return DataCount(m["num_documents"], m["num_tokens"], m["num_rows"], f"the prepared data in {prepared}")
    plans = plan(data, "train", tokenizer)
    examples = sum(p.target for p in plans)
    tokens = sum(p.tokens or 0.0 for p in plans)
    rows = math.ceil(tokens / (data.max_seq_len * packing_efficiency)) if data.pack else examples
    return DataCount(examples, tokens, rows, "the files (mean tokens of up to 256 tokenized rows per source)")
