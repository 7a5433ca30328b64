"""Data pipeline: sources -> validated conversations -> mix -> tokens + masks -> packed rows -> loader.

    tokenizer = load_tokenizer(cfg.model, cfg.data.cache_dir)
    train = prepare(cfg.data, tokenizer)                     # PreparedData (cached, memory-mapped)
    loader = MicroBatchLoader(train, micro_batch_size, rank=rank, world_size=world, seed=cfg.seed)
    for batch in loader: ...                                 # one epoch; loader.state_dict() to resume
"""

from ouro_train.data.cache import PreparedData
from ouro_train.data.chat import ChatEncoder
from ouro_train.data.loader import IGNORE_INDEX, MicroBatchLoader, RowSampler, collate
from ouro_train.data.mix import format_plan, plan_mix
from ouro_train.data.pipeline import format_summary, plan, prepare, split_sources
from ouro_train.data.tokenizer import load_tokenizer, project_tokenizer, tokenizer_hash
from ouro_train.data.validate import DataError

__all__ = [
    "IGNORE_INDEX",
    "ChatEncoder",
    "DataError",
    "MicroBatchLoader",
    "PreparedData",
    "RowSampler",
    "collate",
    "format_plan",
    "format_summary",
    "load_tokenizer",
    "plan",
    "plan_mix",
    "prepare",
    "project_tokenizer",
    "split_sources",
    "tokenizer_hash",
]
