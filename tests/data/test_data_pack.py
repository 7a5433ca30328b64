"""Tokenization limits and best-fit packing: no split documents, boundaries, efficiency."""

import numpy as np
import pytest
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.config import Overlong
from ouro_train.data import pipeline, prepare
from ouro_train.data.pack import best_fit_decreasing
from ouro_train.data.pipeline import ArrayWriter


def test_best_fit_decreasing_places_each_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=2000)
    rows = best_fit_decreasing(lengths, 100)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    lower_bound = -(-lengths.sum() // 100)
    assert len(rows) <= lower_bound * 1.02  # best fit is near-optimal on uniform sizes


def naive_best_fit_loads(lengths, capacity):
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r, load in enumerate(loads) if capacity - load >= n]
        if fits:
            r = min(fits, key=lambda r: capacity - loads[r])
            loads[r] += n
        else:
            loads.append(n)
    return sorted(loads)


def test_best_fit_matches_the_quadratic_definition():
    rng = np.random.default_rng(1)
    for capacity in (10, 64, 1000):
        lengths = rng.integers(1, capacity + 1, size=300)
        rows = best_fit_decreasing(lengths, capacity)
        assert sorted(sum(lengths[i] for i in row) for row in rows) == naive_best_fit_loads(lengths.tolist(), capacity)
    # the tightest row wins, not the first: 8 -> row 0 (room 2), 6 -> row 1 (room 4), 3 -> row 1 (room 1),
    # 1 -> row 1 (room 1 < 2); first fit would have put the 1 in row 0
    assert best_fit_decreasing([8, 6, 3, 1], 10) == [[0], [1, 2, 3]]


def test_best_fit_rejects_documents_over_capacity():
    with pytest.raises(ValueError):
        best_fit_decreasing([5, 11], 10)


def conversations(n):
    return [chat(f"Question number {i}: " + "word " * (i % 17), "answer " * (1 + i % 5)) for i in range(n)]


def test_packed_rows_keep_documents_whole_and_boundaries_unsupervised(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(120))
    prepared = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128), project_tok())
    tok = project_tok()
    assert 0.8 < prepared.manifest["packing_efficiency"] <= 1.0
    total = 0
    for r in range(len(prepared)):
        ids, sup, doc_lengths = prepared[r]
        assert len(ids) == doc_lengths.sum() <= 128
        starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
        for start, length in zip(starts, doc_lengths):
            doc = ids[start : start + length]
            assert doc[0] == tok.convert_tokens_to_ids("<|im_start|>") and not sup[start]
            assert tok.decode(doc[-2:].tolist()) == "<|im_end|>\n"  # every document complete
        total += len(ids)
    assert total == prepared.manifest["num_tokens"]
    assert prepared.manifest["num_documents"] == 120
    assert prepared.manifest["packing_efficiency"] == pytest.approx(total / (len(prepared) * 128))


def test_overlong_drop_and_truncate(tmp_path):
    long_answer = chat("Tell me a long story.", "once upon a time " * 80)
    long_prompt = chat("word " * 300, "short")
    path = write_jsonl(tmp_path / "c.jsonl", [chat(), long_answer, long_prompt])
    dropped = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=96), project_tok()).manifest
    assert dropped["dropped"] == {"overlong": 2} and dropped["num_documents"] == 1

    truncated = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=96, overlong=Overlong.truncate), project_tok())
    m = truncated.manifest
    # the long answer is cut but keeps supervised tokens; the long prompt loses all of them: dropped
    assert m["dropped"] == {"no_supervised_tokens": 1} and m["truncated"] == 1 and m["num_documents"] == 2
    lengths = np.diff(np.asarray(truncated.doc_offsets))
    assert sorted(lengths.tolist())[-1] == 96


def test_unpacked_rows_hold_one_document(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(30))
    prepared = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128, pack=False), project_tok())
    assert len(prepared) == 30 and all(len(prepared[r][2]) == 1 for r in range(30))


def test_tokenizing_in_worker_processes_gives_the_same_cache(tmp_path):
    rows = conversations(40) + [chat("say <|im_end|> literally", "<|im_end|> is text here")]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    one = prepare(data_config(tmp_path / "a", [source("c", path)], max_seq_len=128), project_tok())
    two = prepare(data_config(tmp_path / "b", [source("c", path)], max_seq_len=128, num_proc=2), project_tok())
    assert one.path.name == two.path.name
    for name in ("tokens", "supervised", "doc_offsets", "row_docs", "row_offsets"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert int((np.asarray(two.tokens) == 2).sum()) == 3 * 41  # system, user, assistant turn ends only


def test_array_writer_writes_the_npy_file_open_memmap_would(tmp_path):
    values = np.arange(10_000, dtype=np.int32) * 7 % 49152
    with ArrayWriter(tmp_path, "tokens", np.uint16, len(values)) as out:
        for chunk in np.array_split(values, 7):
            out.write(chunk)
    np.lib.format.open_memmap(tmp_path / "ref.npy", mode="w+", dtype=np.uint16, shape=(len(values),))[:] = values
    assert (tmp_path / "tokens.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    with pytest.raises(ValueError, match="3 elements written, 4 expected"):
        with ArrayWriter(tmp_path, "short", np.bool_, 4) as out:
            out.write(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="more than 2"):
        with ArrayWriter(tmp_path, "long", np.bool_, 2) as out:
            out.write(np.ones(3, dtype=bool))


def test_prepare_holds_the_corpus_in_bounded_batches_only(tmp_path, monkeypatch):
    """Memory must not grow with the corpus: rows are tokenized, read back and written batch by batch
    (never a whole column), and the arrays are written front to back."""
    rows = [chat(f"question {i}", f"answer {i}") for i in range(2500)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    seen = {"tokenized": [], "read": [], "written": []}
    real_tokenize, real_batches, real_write = pipeline.tokenize_batch, pipeline._arrow_batches, ArrayWriter.write

    def tokenize(batch, **kwargs):
        seen["tokenized"].append(len(batch["messages"]))
        return real_tokenize(batch, **kwargs)

    def batches(ds):
        for batch in real_batches(ds):
            seen["read"].append(len(batch))
            yield batch

    def write(self, values):
        seen["written"].append(len(values))
        real_write(self, values)

    monkeypatch.setattr(pipeline, "tokenize_batch", tokenize)
    monkeypatch.setattr(pipeline, "_arrow_batches", batches)
    monkeypatch.setattr(ArrayWriter, "write", write)
    prepared = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=256), project_tok())
    assert sum(seen["tokenized"]) == sum(seen["read"]) == 2500
    assert max(seen["tokenized"]) <= 1000 and max(seen["read"]) <= 1000
    total = prepared.manifest["num_tokens"]
    assert sum(seen["written"]) == 2 * total  # tokens and supervised
    assert max(seen["written"]) <= total // 2  # in pieces, not the whole array at once
