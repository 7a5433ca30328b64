"""The prepared-data cache: reuse without re-tokenizing, rebuild on change, atomic writes, manifest."""

import copy
import json

import numpy as np
import pytest
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.data import pipeline, prepare, tokenizer_hash
from ouro_train.data.cache import FORMAT_VERSION


@pytest.fixture
def counted_tokenization(monkeypatch):
    calls = []
    real = pipeline.tokenize_batch

    def counting(batch, **kwargs):
        calls.append(len(batch["messages"]))
        return real(batch, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_batch", counting)
    return calls


def test_same_config_reuses_without_tokenizing(tmp_path, counted_tokenization):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    data = data_config(tmp_path, [source("c", path)], max_seq_len=128)
    first = prepare(data, project_tok())
    assert sum(counted_tokenization) == 20
    again = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128, num_proc=2), project_tok())
    assert sum(counted_tokenization) == 20, "re-tokenized although nothing that matters changed"
    assert again.path == first.path and np.array_equal(again.tokens, first.tokens)


def test_changed_config_data_or_tokenizer_rebuilds(tmp_path, counted_tokenization):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    base = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128), project_tok())
    paths = {base.path}
    for changed in (dict(max_seq_len=256), dict(pack=False), dict(seed=3), dict(last_turn_only=True),
                    dict(train_on_prompt=True), dict(mask_turn_end=False), dict(shuffle=False), dict(val_size=2)):
        paths.add(prepare(data_config(tmp_path, [source("c", path)], **{"max_seq_len": 128, **changed}), project_tok()).path)
    paths.add(prepare(data_config(tmp_path, [source("c", path, count=10)], max_seq_len=128), project_tok()).path)
    write_jsonl(path, [chat(f"q{i}", f"a{i}") for i in range(21)])  # the file changes
    paths.add(prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128), project_tok()).path)
    assert len(paths) == 11
    other_tok = copy.deepcopy(project_tok())
    other_tok.chat_template = other_tok.chat_template.replace("You are a helpful assistant.", "Hi.")
    rebuilt = prepare(data_config(tmp_path, [source("c", path)], max_seq_len=128), other_tok)
    assert rebuilt.path not in paths
    assert rebuilt.manifest["tokenizer_hash"] == tokenizer_hash(other_tok) != tokenizer_hash(project_tok())


def test_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [chat()] * 5)
    data = data_config(tmp_path, [source("c", path)], max_seq_len=128)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, project_tok())
    assert list((tmp_path / "cache").iterdir()) == [], "a partial cache directory was left behind"
    monkeypatch.undo()
    assert prepare(data, project_tok()).manifest["num_documents"] == 5


def test_manifest_contents(tmp_path):
    math = write_jsonl(tmp_path / "m.jsonl", [chat(f"{i}+1?", str(i + 1)) for i in range(30)] + [b"{oops"])
    talk = write_jsonl(tmp_path / "t.jsonl", [chat(f"hi {i}", "hello") for i in range(10)])
    from ouro_train.config import OnBadRow

    data = data_config(
        tmp_path, [source("math", math, domain="math"), source("talk", talk, domain="chat", epochs=2.0)],
        max_seq_len=128, on_bad_row=OnBadRow.skip, max_bad_fraction=0.05,
    )
    prepared = prepare(data, project_tok())
    m = json.loads((prepared.path / "manifest.json").read_text())
    assert m == prepared.manifest
    assert m["config_hash"] in prepared.path.name and m["tokenizer_hash"] == tokenizer_hash(project_tok())
    assert m["bad_rows"] == {"bad_json": 1} and m["sources"]["math"]["bad_rows"] == {"bad_json": 1}
    assert m["sources"]["math"]["max_bad_fraction"] == 0.05 and m["sources"]["math"]["with_reasoning"] == 0
    logged = [json.loads(line) for line in (prepared.path / "bad_rows.jsonl").read_text().splitlines()]
    assert logged == [{"source": "math", "location": f"{math}:31", "reason": "bad_json",
                       "error": f"source 'math' {math}:31: bad JSON: Expecting property name enclosed in double quotes "
                                "at column 2 (one JSON object per line expected)"}]
    assert (m["num_documents"], m["num_unique_documents"]) == (50, 40)
    assert m["domains"]["chat"]["documents"] == 20 and m["domains"]["math"]["documents"] == 30
    assert m["num_rows"] == len(prepared) and m["num_tokens"] == sum(len(prepared[r][0]) for r in range(len(prepared)))
    assert m["num_supervised_tokens"] == sum(int(prepared[r][1].sum()) for r in range(len(prepared)))
    assert 0 < m["packing_efficiency"] <= 1 and FORMAT_VERSION == 2
    assert prepared.tokens.dtype == np.uint16 and isinstance(prepared.tokens, np.memmap)
