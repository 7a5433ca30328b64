"""Sampler sharding and exact resume; collation of packed and padded micro-batches."""

import numpy as np
import pytest
import torch
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.data import IGNORE_INDEX, MicroBatchLoader, RowSampler, collate, prepare


def test_ranks_split_each_epoch_without_overlap():
    n, world = 103, 4
    epochs = []
    for epoch in range(2):
        per_rank = []
        for rank in range(world):
            s = RowSampler(n, rank=rank, world_size=world, seed=5)
            s.load_state_dict({"epoch": epoch, "offset": 0, "seed": 5, "num_rows": n})
            per_rank.append(list(s))
        assert all(len(rows) == n // world for rows in per_rank)
        seen = [r for rows in per_rank for r in rows]
        assert len(set(seen)) == len(seen) == n - n % world  # the remainder (3 rows) is dropped
        epochs.append(seen)
    assert sorted(epochs[0]) != sorted(epochs[1])  # a new permutation drops other rows
    assert list(RowSampler(10, shuffle=False)) == list(range(10))


def test_order_is_deterministic_from_seed_and_epoch():
    a, b = RowSampler(50, seed=1), RowSampler(50, seed=1)
    assert list(a) == list(b) and list(a) == list(b)  # epoch 0, then epoch 1
    assert a.epoch == 2 and list(RowSampler(50, seed=2)) != list(RowSampler(50, seed=1))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rows = [chat(f"Question {i}: " + "more " * (i % 13), "answer " * (1 + i % 7)) for i in range(90)]
    path = write_jsonl(tmp / "c.jsonl", rows)
    packed = prepare(data_config(tmp, [source("c", path)], max_seq_len=160), project_tok())
    padded = prepare(data_config(tmp, [source("c", path)], max_seq_len=160, pack=False), project_tok())
    return packed, padded


def batches_as_lists(batches):
    return [b["input_ids"].tolist() for b in batches]


@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(prepared, world):
    for data in prepared:
        for rank in range(world):
            full = MicroBatchLoader(data, 3, rank=rank, world_size=world, seed=11)
            uninterrupted = batches_as_lists(list(full) + list(full))  # two epochs
            run = MicroBatchLoader(data, 3, rank=rank, world_size=world, seed=11)
            it = iter(run)
            head = [next(it) for _ in range(4)]
            state = run.state_dict()
            fresh = MicroBatchLoader(data, 3, rank=rank, world_size=world, seed=11)
            fresh.load_state_dict(state)
            rest = list(fresh) + list(fresh)
            assert batches_as_lists(head + rest) == uninterrupted


def test_resume_with_another_world_size_continues_the_same_order(prepared):
    data = prepared[1]
    one = RowSampler(len(data), seed=3)
    order = one.order(0).tolist()
    two_ranks = [RowSampler(len(data), rank=r, world_size=2, seed=3) for r in range(2)]
    taken, its = [], [iter(s) for s in two_ranks]
    for _ in range(10):
        taken += [next(it) for it in its]
    assert taken == order[:20]
    resumed = [RowSampler(len(data), rank=r, world_size=4, seed=3) for r in range(4)]
    for s in resumed:
        s.load_state_dict(two_ranks[0].state_dict())
    its = [iter(s) for s in resumed]
    assert [next(it) for it in its] == order[20:24]


def test_state_from_other_data_is_refused():
    s = RowSampler(10, seed=0)
    with pytest.raises(ValueError, match="resuming on other data"):
        s.load_state_dict(RowSampler(11, seed=0).state_dict())


def test_packed_collation(prepared):
    data = prepared[0]
    batch = next(iter(MicroBatchLoader(data, 2, seed=0)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 160)
    assert batch["attention_mask"] is None
    segments, real = [], 0
    for b, row in enumerate(RowSampler(len(data), seed=0).order(0)[:2]):
        ids, sup, doc_lengths = data[int(row)]
        n = len(ids)
        real += n
        assert batch["input_ids"][b, :n].tolist() == ids.tolist() and not batch["input_ids"][b, n:].any()
        assert batch["labels"][b, :n].tolist() == np.where(sup, ids, IGNORE_INDEX).tolist()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        expected_pos = np.concatenate([np.arange(k) for k in [*doc_lengths, 160 - n]])
        assert batch["position_ids"][b].tolist() == expected_pos.tolist()
        for start in np.flatnonzero(expected_pos == 0):
            assert batch["labels"][b, start] == IGNORE_INDEX  # no target across a document boundary
        segments += [*doc_lengths.tolist(), 160 - n]
    assert batch["cu_seq_lens"].tolist() == np.concatenate([[0], np.cumsum(segments)]).tolist()
    assert batch["cu_seq_lens"].dtype == torch.int32 and batch["max_seqlen"] == max(segments)
    assert batch["num_supervised_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    assert batch["num_tokens"] == real


def test_collate_positions_padding_and_counts():
    ids = np.array([1, 5, 6, 2, 1, 7, 2])
    sup = np.array([0, 0, 1, 1, 0, 1, 1], dtype=bool)
    packed = collate([(ids, sup, np.array([4, 3]))], packed=True, seq_len=10)
    assert packed["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2, 0, 0, 0]]
    assert packed["labels"].tolist() == [[-100, -100, 6, 2, -100, 7, 2, -100, -100, -100]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert packed["cu_seq_lens"].tolist() == [0, 4, 7, 10] and packed["max_seqlen"] == 4
    assert packed["num_supervised_tokens"] == 4 and packed["num_tokens"] == 7

    short = (np.array([1, 9, 2]), np.array([0, 1, 1], dtype=bool), np.array([3]))
    padded = collate([(ids[:4], sup[:4], np.array([4])), short], packed=False, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert padded["cu_seq_lens"].tolist() == [0, 4, 8, 11, 16]
    assert padded["num_supervised_tokens"] == 4


def test_padded_loader_and_epoch_length(prepared):
    data = prepared[1]
    loader = MicroBatchLoader(data, 4, world_size=2, rank=1, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-(len(data) // 2) // 4)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(data) // 2
    for b in batches:
        assert b["attention_mask"] is not None and b["input_ids"].shape[1] % 8 == 0
        assert torch.all(b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX)
