"""Mixing: deterministic draws, the three ways to size a source, proportions, and the plan table."""

import numpy as np
import pytest
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.config import SourceConfig
from ouro_train.data import DataError, format_plan, plan, plan_mix, prepare
from ouro_train.data.mix import draw


def test_draw_is_deterministic_and_per_source():
    a = draw(100, 250, False, seed=7, name="math")
    assert np.array_equal(a, draw(100, 250, False, seed=7, name="math"))
    assert not np.array_equal(a, draw(100, 250, False, seed=8, name="math"))
    assert not np.array_equal(a, draw(100, 250, False, seed=7, name="code"))
    # two whole passes, then 50 distinct rows
    assert sorted(a[:100]) == list(range(100)) and sorted(a[100:200]) == list(range(100))
    assert len(set(a[200:].tolist())) == 50


def test_count_without_replacement_is_distinct_with_replacement_repeats():
    assert len(set(draw(1000, 1000, False, 0, "s").tolist())) == 1000
    with_replacement = draw(1000, 1000, True, 0, "s")
    assert len(with_replacement) == 1000 and len(set(with_replacement.tolist())) < 1000
    assert with_replacement.min() >= 0 and with_replacement.max() < 1000


def test_targets_from_count_epochs_weight():
    sources = [
        SourceConfig(name="a", count=30),
        SourceConfig(name="b", epochs=2.5),
        SourceConfig(name="c"),
        SourceConfig(name="d", weight=3.0),
        SourceConfig(name="e", weight=1.0),
    ]
    plans = plan_mix(sources, [100, 10, 7, 50, 50], mix_size=401)
    assert [p.target for p in plans] == [30, 25, 7, 301, 100]
    # without mix_size the weighted sources share their own total
    assert [p.target for p in plan_mix(sources, [100, 10, 7, 50, 50])][3:] == [75, 25]


def test_bad_specs_are_rejected():
    with pytest.raises(DataError, match="source 'x': set at most one of weight / count / epochs"):
        plan_mix([SourceConfig(name="x", count=3, epochs=1.0)], [10])
    with pytest.raises(DataError, match="source 'y': 5 rows asked of a source with no valid rows"):
        plan_mix([SourceConfig(name="y", count=5)], [0])


def test_mix_proportions_within_tolerance(tmp_path):
    """Rows of two domains mixed 3:1 by weight: the prepared documents follow within 1%."""
    math = write_jsonl(tmp_path / "math.jsonl", [chat(f"{i}+{i}?", str(2 * i)) for i in range(200)])
    chat_rows = write_jsonl(tmp_path / "chat.jsonl", [chat(f"hello {i}", "hi") for i in range(50)])
    sources = [source("math", math, domain="math", weight=3.0), source("chat", chat_rows, domain="chat", weight=1.0)]
    data = data_config(tmp_path, sources, mix_size=400, max_seq_len=256)
    prepared = prepare(data, project_tok())
    manifest = prepared.manifest
    docs = {d: v["documents"] for d, v in manifest["domains"].items()}
    assert sum(docs.values()) == 400
    assert abs(docs["math"] / 400 - 0.75) < 0.01 and abs(docs["chat"] / 400 - 0.25) < 0.01
    assert manifest["sources"]["chat"]["unique_selected"] == 50  # 100 rows from 50: two whole passes
    # another seed draws other rows
    other = prepare(data_config(tmp_path, sources, mix_size=400, max_seq_len=256, seed=1), project_tok())
    assert other.path != prepared.path and not np.array_equal(other.row_docs, prepared.row_docs)


def test_plan_table(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat()] * 6 + [chat(reasoning="2 + 2 = 4.")] * 4)
    data = data_config(tmp_path, [source("a", path, domain="math", epochs=3.0), source("b", path, domain="chat", count=10)])
    table = format_plan(plan(data))
    # available 10: 4 with reasoning, 6 without
    assert "a                            math                10           4            6 epochs=3                        30    3.00   75.0%" in table
    assert "total                                 40" in table


def test_plan_estimates_tokens_from_a_tokenized_sample(tmp_path):
    """With every row in the sample the estimate is exact: it equals what prepare writes."""
    path = write_jsonl(tmp_path / "a.jsonl", [chat(f"question {i} " * (i % 5 + 1), "answer " * (i + 1)) for i in range(40)])
    data = data_config(tmp_path, [source("a", path, domain="math", epochs=2.0), source("b", path, domain="chat", count=7)],
                       max_seq_len=4096)
    plans = {p.name: p for p in plan(data, tokenizer=project_tok(), sample=1000)}
    manifest = prepare(data, project_tok()).manifest
    for name in ("a", "b"):
        assert plans[name].epochs == manifest["sources"][name]["selected"] / 40
    assert plans["a"].tokens == manifest["sources"]["a"]["tokens"]  # two whole passes: exactly every row twice
    assert abs(plans["b"].tokens - manifest["sources"]["b"]["tokens"]) <= 0.5 * manifest["sources"]["b"]["tokens"]
    table = format_plan(list(plans.values()))
    assert f"{manifest['sources']['a']['tokens']:,}" in table


def test_a_source_can_be_switched_off_and_eval_files_prepare_apart(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", "a") for i in range(12)])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [chat(f"e{i}", "b") for i in range(5)])
    data = data_config(tmp_path, [source("on", path, count=4), source("off", path, count=0)], max_seq_len=64)
    data.eval_files = [str(held_out)]
    train = prepare(data, project_tok())
    assert train.manifest["sources"]["off"]["kept"] == 0 and train.manifest["num_documents"] == 4
    evaluation = prepare(data, project_tok(), "eval")
    assert evaluation.path != train.path and evaluation.path.name.startswith("eval-")
    assert list(evaluation.manifest["sources"]) == ["held_out"] and evaluation.manifest["num_documents"] == 5
    with pytest.raises(DataError, match="names must be unique"):
        prepare(data_config(tmp_path, [source("a", path)], train_files=[str(path)]), project_tok())
