"""The prepare pipeline: sources -> validated conversations -> mix -> tokens -> packed rows in a cache directory.

    data = prepare(cfg.data, tokenizer)            # PreparedData, built once, then reused
    data = prepare(cfg.data, tokenizer, "eval")    # from data.eval_sources / data.eval_files

Order of work: every source is loaded and validated first (with `on_bad_row=error` the first bad row
stops the run before any tokenization; with `skip` a source over its bad-row budget does, and the first
bad rows of each source are kept in `bad_rows.jsonl` beside the manifest, or beside where the cache
directory would have been when the run stops); then the mix draws its rows; only drawn rows are tokenized
(`.map(num_proc=data.num_proc)`); overlong documents are dropped or truncated; rows are packed and
written. With `data.val_size` the held-out rows are taken from the valid rows before the mix (`hold_out`):
the train split mixes the rest, the eval split takes each held-out row once. A cache directory whose
key matches is reused without loading or tokenizing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ouro_train.config import DataConfig, SourceConfig
from ouro_train.data.cache import PreparedData, atomic_dir, cache_key, content_sha256, new_array, write_manifest
from ouro_train.data.chat import ChatEncoder, Supervision
from ouro_train.data.dataset_info import dataset_info_sources
from ouro_train.data.mix import SourcePlan, draw, plan_mix
from ouro_train.data.pack import DROP_REASONS, TOKENIZED, best_fit_decreasing, tokenize_batch
from ouro_train.data.sources import load_source
from ouro_train.data.tokenizer import tokenizer_hash
from ouro_train.data.validate import DataError, check_budgets, check_data_config

Log = Callable[[str], None]
BAD_ROWS_LOGGED = 100  # per source, in bad_rows.jsonl
VAL_SPLIT_STREAM = 0x5A1  # the random stream of data.val_size, apart from the mix's per-source streams
# Source settings that choose rows from a scan rather than change how it reads them.
SELECTION_FIELDS = ("name", "domain", "where", "weight", "count", "epochs", "replace", "max_bad_fraction")


@dataclass
class Checked:
    """A loaded, validated source: its rows (shared by the sources that read the same data), the
    indices of its valid ones, bad-row counts, rows its `where` left out, valid rows with reasoning."""

    src: SourceConfig
    rows: object  # datasets.Dataset with sources.FEATURES
    valid: np.ndarray
    bad: Counter
    filtered: int
    with_reasoning: int


def split_sources(data: DataConfig, split: str) -> list[SourceConfig]:
    """The sources of a split: the listed ones, one per convenience file, the named dataset_info.json
    entries. With `data.val_size` the eval split reads the training sources (and keeps the held-out rows)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    check_data_config(data)
    if split == "eval" and data.val_size:
        split = "train"
    listed, files, named = ((data.sources, data.train_files, data.datasets) if split == "train" else
                            (data.eval_sources, data.eval_files, data.eval_datasets))
    sources = list(listed) + [SourceConfig(name=Path(f).stem, path=f) for f in files]
    if named:
        sources += dataset_info_sources(data.dataset_info, named, "data.datasets" if split == "train" else "data.eval_datasets")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"{split} source names must be unique, got {names}")
    return sources


def hold_out(data: DataConfig, checked: list[Checked], split: str) -> list[SourcePlan] | None:
    """`data.val_size`: draw the held-out rows from all sources' valid rows together (seeded by
    data.seed) and keep, in each Checked, the rest (train) or only those (eval). For eval, the plan
    takes each held-out row once, whatever the sources' weight/count/epochs; None: plan as usual."""
    if not data.val_size:
        return None
    counts = [len(c.valid) for c in checked]
    total = sum(counts)
    k = int(data.val_size) if data.val_size >= 1 else int(round(data.val_size * total))
    if not 1 <= k < total:
        raise DataError(f"data.val_size={data.val_size:g} holds out {k} of the {total} valid training rows; "
                        "it must leave at least one row on each side")
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng([data.seed, VAL_SPLIT_STREAM]).choice(total, size=k, replace=False)] = True
    start = 0
    for c, n in zip(checked, counts):
        mine = held[start : start + n]
        c.valid = c.valid[mine] if split == "eval" else c.valid[~mine]
        start += n
    if split == "train":
        return None
    once = [dataclasses.replace(c.src, weight=None, count=None, epochs=1.0, replace=False) for c in checked]
    return plan_mix(once, [len(c.valid) for c in checked])


def check_sources(data: DataConfig, sources: list[SourceConfig], work: Path, bad_rows_log: Path | None = None) -> list[Checked]:
    """Load and validate every source, reading data that several sources share once. DataError on the
    first bad row under on_bad_row=error; under skip the first bad rows of each source go to
    `bad_rows_log` and DataError names the first source over its bad-row budget."""
    where_columns: dict[str, set] = {}
    for src in sources:
        where_columns.setdefault(scan_key(src), set()).update(src.where)
    where_keys = {key: sorted(columns) for key, columns in where_columns.items()}
    scans: dict[str, object] = {}
    checked, reports, logged = [], [], []
    for i, src in enumerate(sources):
        key = scan_key(src)
        if key not in scans:
            scans[key] = load_source(src, work / f"source-{i}", data.num_proc, where_keys[key], data.allow_empty_answer)
        c, in_source, bad = _select(src, scans[key], where_keys[key])
        first = c.rows[int(np.argmax(bad))]["error"] if bad.any() else None
        checked.append(c)
        reports.append((src, int(in_source.sum()), len(c.valid), c.bad, first))
        logged += [{"source": src.name, **r} for r in c.rows.select(np.flatnonzero(bad)[:BAD_ROWS_LOGGED])
                   .select_columns(["location", "reason", "error"]).to_list()]
    log = None
    if bad_rows_log is not None and logged and data.on_bad_row.value == "skip":
        bad_rows_log.write_text("".join(json.dumps(r) + "\n" for r in logged))
        log = str(bad_rows_log)
    check_budgets(reports, data.on_bad_row.value, data.max_bad_fraction, log)
    return checked


def scan_key(src: SourceConfig) -> str:
    """What a source's scan depends on: sources with equal keys read the same rows the same way."""
    spec = {k: v for k, v in dataclasses.asdict(src).items() if k not in SELECTION_FIELDS}
    return json.dumps(spec, sort_keys=True, default=str)


def _select(src: SourceConfig, rows, where_keys: list[str]) -> tuple[Checked, np.ndarray, np.ndarray]:
    """The source's share of a scan: (Checked, rows its `where` keeps, its bad rows). Per-row work is
    Arrow compute over the columns plus one bool per row, so hub-sized scans stay small in memory."""
    reason = rows.data.column("reason")
    in_source = np.ones(len(rows), dtype=bool)
    if src.where:
        where = rows.data.column("where")
        values = pc.unique(where).to_pylist()
        decoded = {v: dict(zip(where_keys, json.loads(v))) if v else None for v in values}
        # a row unreadable as an object (bad JSON) has no values: it counts against every source of the scan
        kept = [v for v, row in decoded.items() if row is None or _matches(row, src.where)]
        in_source = pc.is_in(where, value_set=pa.array(kept, pa.string())).to_numpy()
        if not in_source.any() and len(rows):
            raise DataError(f"source '{src.name}': `where` {src.where} matches none of its {len(rows):,} rows; "
                            f"values found: {_found(list(decoded.values()), src.where)}")
    ok = pc.equal(reason, "").to_numpy()
    bad, good = in_source & ~ok, in_source & ok
    counts = pc.value_counts(pc.filter(reason, pa.array(bad))).to_pylist()
    has_reasoning = rows.data.column("has_reasoning").to_numpy()
    c = Checked(src, rows, np.flatnonzero(good), Counter({c["values"]: c["counts"] for c in counts}),
                int((~in_source).sum()), int(has_reasoning[good].sum()))
    return c, in_source, bad


def _matches(row: dict, where: dict) -> bool:
    return all(row[k] in wanted if isinstance(wanted, (list, tuple)) else row[k] == wanted for k, wanted in where.items())


def _found(decoded: list, where: dict, shown: int = 20) -> str:
    """The distinct values of each `where` column, as a readable list (the first `shown` of each)."""
    out = []
    for k in where:
        seen = sorted({json.dumps(v[k]) for v in decoded if v is not None})
        out.append(f"{k}: {', '.join(seen[:shown])}" + (f" (+{len(seen) - shown} more)" if len(seen) > shown else ""))
    return "; ".join(out)


def plan(data: DataConfig, split: str = "train", tokenizer=None, sample: int = 256) -> list[SourcePlan]:
    """The mix plan of a split (loads and validates the sources). With a tokenizer, up to `sample`
    valid rows of each source are tokenized to estimate its tokens per row; nothing else is."""
    sources = split_sources(data, split)
    Path(data.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data.cache_dir, prefix=".plan-") as work:
        checked = check_sources(data, sources, Path(work))
        plans = hold_out(data, checked, split) or plan_mix(sources, [len(c.valid) for c in checked], data.mix_size)
        for c, p in zip(checked, plans):
            p.with_reasoning = c.with_reasoning
        if tokenizer is not None:
            encoder = ChatEncoder(tokenizer)
            for c, p in zip(checked, plans):
                p.mean_tokens = _mean_tokens(c, encoder, data, sample)
        return plans


def _mean_tokens(c: Checked, encoder: ChatEncoder, data: DataConfig, sample: int) -> float | None:
    """Mean tokens per row that would enter the mix (overlong rows truncated or left out, per config)."""
    if len(c.valid) == 0:
        return None
    picks = np.random.default_rng(data.seed).choice(c.valid, size=min(sample, len(c.valid)), replace=False)
    lengths = np.array([len(ids) for ids, _ in encoder.encode_batch(c.rows.select(picks)["messages"],
                                                                     supervision=Supervision.of(data))])
    kept = np.minimum(lengths, data.max_seq_len) if data.overlong.value == "truncate" else lengths[lengths <= data.max_seq_len]
    return float(kept.mean()) if len(kept) else None


def prepare(data: DataConfig, tokenizer, split: str = "train", log: Log = print) -> PreparedData:
    sources = split_sources(data, split)
    if not sources:
        raise DataError(f"no {split} sources: set data.{'sources' if split == 'train' else 'eval_sources'} or data.{split}_files")
    key = cache_key(split, sources, data, tokenizer_hash(tokenizer))
    target = Path(data.cache_dir) / f"{split}-{key}"
    if (target / "manifest.json").exists():
        log(f"[{split}] reusing prepared data in {target}")
        return PreparedData(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    bad_rows_log = target.with_name(f"{target.name}.bad_rows.jsonl")  # kept there if the budget check fails
    bad_rows_log.unlink(missing_ok=True)
    with atomic_dir(target) as tmp:
        checked = check_sources(data, sources, tmp / "work", bad_rows_log)
        plans = hold_out(data, checked, split) or plan_mix(sources, [len(c.valid) for c in checked], data.mix_size)
        manifest = _build(data, tokenizer, checked, plans, tmp)
        del checked
        shutil.rmtree(tmp / "work")
        if bad_rows_log.exists():
            bad_rows_log.rename(tmp / "bad_rows.jsonl")
        manifest.update(split=split, config_hash=key, tokenizer_hash=tokenizer_hash(tokenizer),
                        content_sha256=content_sha256(tmp))
        write_manifest(tmp, manifest)
    log(f"[{split}] prepared data in {target}")
    return PreparedData(target)


def _build(data: DataConfig, tokenizer, checked: list[Checked], plans: list[SourcePlan], out: Path) -> dict:
    """Tokenize the drawn rows, drop what must go, pack, and write the arrays; returns the manifest.
    Each source's rows are let go (`rows = None`) once they are tokenized."""
    if data.num_proc > 1:  # each worker encodes on its own core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoder = ChatEncoder(tokenizer)
    kwargs = {
        "encoder": encoder,
        "max_seq_len": data.max_seq_len,
        "truncate": data.overlong.value == "truncate",
        "supervision": Supervision.of(data),
    }
    parts, ref_docs, sources_out = [], [], {}
    next_doc = 0
    for s, (c, p) in enumerate(zip(checked, plans)):
        picks = c.valid[draw(len(c.valid), p.target, c.src.replace, data.seed, c.src.name, data.shuffle)]
        unique, inverse = np.unique(picks, return_inverse=True)
        if len(unique) == 0:  # nothing drawn (count: 0); map() over no rows would drop the columns
            tokenized = datasets.Dataset.from_dict({name: [] for name in TOKENIZED}, features=TOKENIZED)
        else:
            tokenized = c.rows.select(unique).map(
                tokenize_batch,
                batched=True,
                remove_columns=c.rows.column_names,
                features=TOKENIZED,
                fn_kwargs=kwargs,
                num_proc=data.num_proc if data.num_proc > 1 else None,
                cache_file_name=str(out / "work" / f"tokens-{s}.arrow"),
                desc=f"tokenizing {c.src.name}",
            )
        c.rows = None  # unmapped once no other source of the same scan still needs it
        cols = tokenized.with_format("numpy", columns=["length", "num_supervised", "truncated"])[:]
        drop = tokenized.data.column("drop").to_numpy(zero_copy_only=False)
        kept = drop == ""
        new_id = np.cumsum(kept) - 1 + next_doc  # id of each kept unique document among all sources
        next_doc += int(kept.sum())
        ref_kept = kept[inverse]
        ref_docs.append(new_id[inverse][ref_kept])
        parts.append((tokenized, kept, cols["length"][kept]))
        sources_out[c.src.name] = {
            "domain": c.src.domain,
            "available": len(c.valid),
            "bad_rows": dict(c.bad),
            "max_bad_fraction": data.max_bad_fraction if c.src.max_bad_fraction is None else c.src.max_bad_fraction,
            "filtered": c.filtered,
            "with_reasoning": c.with_reasoning,
            "spec": p.spec,
            "selected": p.target,
            "unique_selected": len(unique),
            "kept": int(ref_kept.sum()),
            "dropped": {r: int((drop[inverse] == r).sum()) for r in DROP_REASONS if (drop[inverse] == r).any()},
            "truncated": int(cols["truncated"][inverse][ref_kept].sum()),
            "tokens": int(cols["length"][inverse].sum()),  # dropped documents count 0
            "supervised_tokens": int(cols["num_supervised"][inverse].sum()),
        }
    ref_docs = np.concatenate(ref_docs) if ref_docs else np.zeros(0, np.int64)
    doc_lengths = np.concatenate([length for _, _, length in parts]).astype(np.int64)
    doc_offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=doc_offsets[1:])
    _write_tokens(out, parts, int(doc_offsets[-1]), len(tokenizer))

    ref_lengths = doc_lengths[ref_docs]
    rows = best_fit_decreasing(ref_lengths, data.max_seq_len) if data.pack else [[i] for i in range(len(ref_docs))]
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    row_docs = ref_docs[np.concatenate(rows).astype(np.int64)] if rows else np.zeros(0, np.int64)
    for name, array in (("doc_offsets", doc_offsets), ("row_docs", row_docs), ("row_offsets", row_offsets)):
        new_array(out, name, np.int64, len(array))[:] = array

    num_tokens = int(ref_lengths.sum())
    return {
        "pack": data.pack,
        "max_seq_len": data.max_seq_len,
        "overlong": data.overlong.value,
        "last_turn_only": data.last_turn_only,
        "train_on_prompt": data.train_on_prompt,
        "mask_turn_end": data.mask_turn_end,
        "shuffle": data.shuffle,
        "val_size": data.val_size,
        "seed": data.seed,
        "num_rows": len(rows),
        "num_documents": len(ref_docs),
        "num_unique_documents": len(doc_lengths),
        "num_tokens": num_tokens,
        "num_supervised_tokens": sum(v["supervised_tokens"] for v in sources_out.values()),
        "packing_efficiency": num_tokens / max(1, len(rows) * data.max_seq_len),
        "bad_rows": dict(sum((c.bad for c in checked), Counter())),
        "dropped": dict(sum((Counter(v["dropped"]) for v in sources_out.values()), Counter())),
        "truncated": sum(v["truncated"] for v in sources_out.values()),
        "sources": sources_out,
        "domains": _by_domain(sources_out),
    }


def _write_tokens(out: Path, parts: list, total: int, vocab_size: int) -> None:
    """Stream every kept document's ids and supervision mask into tokens.npy / supervised.npy. The
    tokenized Arrow files are read batch by batch from the file (not memory-mapped) and the arrays
    written with plain writes (not through a writable memory map), so neither the inputs nor the
    outputs stay resident in this process: its memory does not grow with the corpus here."""
    with ArrayWriter(out, "tokens", np.uint16 if vocab_size <= 1 << 16 else np.uint32, total) as tokens, \
            ArrayWriter(out, "supervised", np.bool_, total) as supervised:
        for tokenized, kept, _ in parts:
            start = 0
            for batch in _arrow_batches(tokenized):
                keep = kept[start : start + len(batch)]
                start += len(batch)
                batch = batch.filter(keep)
                tokens.write(pc.list_flatten(batch.column("input_ids")).to_numpy())
                supervised.write(pc.list_flatten(batch.column("supervised")).to_numpy(zero_copy_only=False))
            assert start == len(kept), (start, len(kept))


def _arrow_batches(ds) -> Iterator[pa.RecordBatch]:
    """The record batches of a dataset written by `.map` (its cache files, in order), read from disk."""
    files = [f["filename"] for f in ds.cache_files]
    if not files or ds._indices is not None:  # in memory (no rows drawn), or a view: read it as datasets does
        yield from ds.with_format("arrow").iter(batch_size=4096)
        return
    for filename in files:
        with pa.OSFile(filename) as f:
            yield from pa.ipc.open_stream(f)


class ArrayWriter:
    """A .npy file of `length` elements written front to back with plain writes, in the format (and
    with the header) `np.lib.format.open_memmap` writes; raises if fewer or more elements came."""

    def __init__(self, directory: Path, name: str, dtype, length: int):
        header = new_array(directory, name, dtype, length)  # the header, and the file at its full size
        self.offset, self.dtype, self.length, self.at = header.offset, np.dtype(dtype), length, 0
        del header
        self.file = open(directory / f"{name}.npy", "r+b")
        self.file.seek(self.offset)

    def write(self, values: np.ndarray) -> None:
        if self.at + len(values) > self.length:
            raise ValueError(f"{self.file.name}: more than {self.length} elements")
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.at += len(values)

    def __enter__(self) -> "ArrayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.at != self.length:
            raise ValueError(f"{self.file.name}: {self.at} elements written, {self.length} expected")


def _by_domain(sources: dict) -> dict:
    out: dict = {}
    for v in sources.values():
        d = out.setdefault(v["domain"], {"documents": 0, "tokens": 0, "supervised_tokens": 0})
        d["documents"] += v["kept"]
        d["tokens"] += v["tokens"]
        d["supervised_tokens"] += v["supervised_tokens"]
    return out


def format_summary(manifest: dict) -> str:
    """A prepared split's manifest as a short table."""
    m = manifest
    lines = [
        f"{'source':<28} {'domain':<10} {'selected':>10} {'kept':>10} {'tokens':>14} {'supervised':>14}",
        *(
            f"{name:<28} {v['domain']:<10} {v['selected']:>10,} {v['kept']:>10,} {v['tokens']:>14,} {v['supervised_tokens']:>14,}"
            for name, v in m["sources"].items()
        ),
        f"rows {m['num_rows']:,} x {m['max_seq_len']} ({'packed' if m['pack'] else 'one document per row'}), "
        f"documents {m['num_documents']:,}, tokens {m['num_tokens']:,}, supervised {m['num_supervised_tokens']:,}, "
        f"packing efficiency {m['packing_efficiency']:.1%}",
        f"bad rows skipped: {m['bad_rows'] or 'none'}; dropped: {m['dropped'] or 'none'}; truncated: {m['truncated']}",
    ]
    return "\n".join(lines)
