"""The data settings LLaMA-Factory users reach for, against the arrays they must produce:
`data.mask_turn_end`, `data.train_on_prompt`, `data.shuffle` and `data.val_size`."""

import numpy as np
import pytest
from data_helpers import chat, data_config, ouro_tok, project_tok, source, write_jsonl

from ouro_train.config import ConfigError, DataConfig
from ouro_train.data import ChatEncoder, DataError, MicroBatchLoader, prepare
from ouro_train.data.chat import IM_END, Supervision

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Solve 3x = 12"},
    {"role": "assistant", "content": "x = 4", "reasoning": "Divide by 3."},
]


def supervised_spans(tok, ids, sup) -> list[str]:
    """The text of each run of supervised tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sup.astype(np.int8), [0]])))
    return [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]


def test_mask_turn_end_false_supervises_what_llamafactorys_reply_slot_holds():
    """LLaMA-Factory's ChatML reply slot is `{content}<|im_end|>\\n`: with mask_turn_end=false the supervised
    runs are exactly those slots; by default (true) the same without the newline. The ids do not change."""
    tok = ouro_tok()
    encoder = ChatEncoder(tok)
    ids, ours = encoder.encode(TWO_TURNS)
    lf_ids, lf = encoder.encode(TWO_TURNS, supervision=Supervision(mask_turn_end=False))
    assert lf_ids.tolist() == ids.tolist()
    replies = ["Hello!", "<think>\nDivide by 3.\n</think>\n\nx = 4"]
    assert supervised_spans(tok, lf_ids, lf) == [f"{r}{IM_END}\n" for r in replies]
    assert supervised_spans(tok, ids, ours) == [f"{r}{IM_END}" for r in replies]
    extra = np.flatnonzero(lf & ~ours)  # one more target per reply: the token after its <|im_end|>
    assert len(extra) == 2 and (ids[extra - 1] == tok.convert_tokens_to_ids(IM_END)).all()


def test_train_on_prompt_supervises_every_token_but_the_first():
    tok = project_tok()
    encoder = ChatEncoder(tok)
    ids, sup = encoder.encode(TWO_TURNS, supervision=Supervision(train_on_prompt=True))
    assert not sup[0]  # a packed row's first token is never a target
    newline_after_reply = [i for i in range(1, len(ids)) if not sup[i]]
    # only the newlines after the two assistant <|im_end|> (mask_turn_end) are left out
    assert len(newline_after_reply) == 2 and all(tok.decode([int(ids[i])]) == "\n" for i in newline_after_reply)
    _, everything = encoder.encode(TWO_TURNS, supervision=Supervision(train_on_prompt=True, mask_turn_end=False))
    assert everything[1:].all() and not everything[0]


def test_prepare_writes_the_chosen_supervision(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}, chat("q", "a")])
    encoder = ChatEncoder(project_tok())
    for options in (dict(train_on_prompt=True), dict(mask_turn_end=False)):
        data = data_config(tmp_path / str(options), [source("c", path)], pack=False, shuffle=False, max_seq_len=256,
                           **options)
        prepared = prepare(data, project_tok(), log=lambda _: None)
        assert prepared.manifest["train_on_prompt"] == options.get("train_on_prompt", False)
        for r, conv in enumerate([TWO_TURNS, chat("q", "a")["messages"]]):
            ids, sup, _ = prepared[r]
            ref_ids, ref_sup = encoder.encode(conv, supervision=Supervision.of(data))
            assert ids.tolist() == ref_ids.tolist() and sup.tolist() == ref_sup.tolist()


def file_rows(tmp_path, name, n):
    rows = [chat(f"{name} question {i}", f"answer {i}") for i in range(n)]
    return rows, write_jsonl(tmp_path / f"{name}.jsonl", rows)


def row_texts(prepared, tok) -> list[str]:
    return [tok.decode(prepared[r][0].tolist()) for r in range(len(prepared))]


def expected_texts(tok, rows) -> list[str]:
    encoder = ChatEncoder(tok)
    return [tok.decode(encoder.encode(r["messages"])[0].tolist()) for r in rows]


def test_shuffle_false_keeps_the_file_order_and_the_loader_takes_it_in_order(tmp_path):
    tok = project_tok()
    a_rows, a = file_rows(tmp_path, "a", 7)
    b_rows, b = file_rows(tmp_path, "b", 5)
    data = data_config(tmp_path, [source("a", a), source("b", b)], pack=False, shuffle=False, max_seq_len=256)
    prepared = prepare(data, tok, log=lambda _: None)
    assert row_texts(prepared, tok) == expected_texts(tok, a_rows + b_rows)
    shuffled = prepare(data_config(tmp_path, [source("a", a), source("b", b)], pack=False, max_seq_len=256), tok,
                       log=lambda _: None)
    assert row_texts(shuffled, tok) != row_texts(prepared, tok)  # the default draws the mix in random order
    # Two ranks take rows 0, 2, 4, ... and 1, 3, 5, ...: file order, whatever the world size; epoch 2 again.
    seen = {rank: [] for rank in (0, 1)}
    for rank in (0, 1):
        loader = MicroBatchLoader(prepared, 1, rank=rank, world_size=2, seed=3, shuffle=False)
        for _ in range(2):
            for mb in loader:
                seen[rank].append(int(mb["input_ids"][0, : mb["num_tokens"]].sum()))
    sums = [int(prepared[r][0].sum()) for r in range(12)]
    assert seen[0] == [sums[r] for r in (0, 2, 4, 6, 8, 10)] * 2
    assert seen[1] == [sums[r] for r in (1, 3, 5, 7, 9, 11)] * 2
    # A resume on one process after two micro-batches of two ranks goes on at row 4, in order.
    first = MicroBatchLoader(prepared, 1, rank=0, world_size=2, shuffle=False)
    batches = iter(first)
    next(batches), next(batches)
    resumed = MicroBatchLoader(prepared, 1, rank=0, world_size=1, shuffle=False)
    resumed.load_state_dict(first.state_dict())
    assert [int(mb["input_ids"][0, : mb["num_tokens"]].sum()) for mb in resumed] == sums[4:]


@pytest.mark.parametrize("val_size, held", [(0.25, 4), (3, 3)])
def test_val_size_holds_out_training_rows_deterministically(tmp_path, val_size, held):
    tok = project_tok()
    a_rows, a = file_rows(tmp_path, "a", 10)
    b_rows, b = file_rows(tmp_path, "b", 6)

    def split(split, cache):
        data = data_config(tmp_path / cache, [source("a", a), source("b", b, epochs=2)], pack=False,
                           max_seq_len=256, val_size=val_size)
        return row_texts(prepare(data, tok, split, log=lambda _: None), tok)

    train, val = split("train", "one"), split("eval", "one")
    everything = expected_texts(tok, a_rows + b_rows)
    assert len(val) == held and len(set(val)) == held  # each held-out row once, whatever the source's epochs
    assert set(val) | set(train) == set(everything) and not set(val) & set(train)
    assert sorted(train) == sorted(t for t in everything if t not in val for _ in range(1 if t.find("a question") > 0 else 2))
    assert (split("train", "two"), split("eval", "two")) == (train, val)  # rebuilt from scratch: the same split


def test_val_size_is_refused_when_it_leaves_nothing_or_beside_eval_files(tmp_path):
    _, a = file_rows(tmp_path, "a", 4)
    with pytest.raises(DataError, match=r"data.val_size=4 holds out 4 of the 4 valid training rows"):
        prepare(data_config(tmp_path, [source("a", a)], val_size=4), project_tok(), "eval")
    with pytest.raises(ConfigError, match="data.val_size: holds out eval rows"):
        DataConfig(val_size=0.1, eval_files=[str(a)]).check("data")
    with pytest.raises(ConfigError, match="data.val_size: must be a fraction"):
        DataConfig(val_size=2.5).check("data")
