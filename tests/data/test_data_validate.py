"""Sources, format adapters and bad rows: every kind reported with its exact location and field."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.config import Format, OnBadRow, SourceConfig
from ouro_train.data import DataError, prepare
from ouro_train.data import pipeline
from ouro_train.data.formats import to_conversation
from ouro_train.data.pipeline import check_sources
from ouro_train.data.validate import BAD_ROW_REASONS

GOOD = chat()
BAD_ROWS = {
    "bad_json": (b'{"messages": [', "bad JSON: Expecting value at column 15 (one JSON object per line expected)"),
    "missing_field": ({"conversation": []}, "field 'messages': missing or null"),
    "bad_type": ({"messages": "hello"}, "field 'messages': expected a list, got str"),
    "unknown_role": (
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        "field 'messages[0].role': unknown role 'robot' (known: system, user, assistant, tool; "
        "map other names with the source's `role_map`)",
    ),
    "non_string_content": (
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
        "field 'messages[0].content': expected a string or a list of content parts, got int",
    ),
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn to train on"),
    "invalid_utf8": (b'{"messages": "caf\xc3"}', "invalid UTF-8 at byte 17 of the line"),
    "unsupported_part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                      {"role": "assistant", "content": "x"}]},
        "field 'messages[0].content[0].type': content part of type 'image_url': only text and reasoning parts are trained on",
    ),
    "unclosed_think": (
        chat(answer="<think>\nLet me see: 2 + 2 is"),
        "field 'messages[1].content': <think> is never closed (a truncated reasoning trace?)",
    ),
    "stray_think_tag": (
        chat(answer="<think>a</think>So 4. <think>Or 5?</think>"),
        "field 'messages[1].content': <think> inside the answer (nested or mid-text reasoning tags)",
    ),
    "empty_answer": (chat(answer=" \n "), "field 'messages[1].content': empty or whitespace-only answer"),
}


def test_every_reason_has_a_case():
    assert set(BAD_ROWS) == set(BAD_ROW_REASONS)


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_error_names_source_file_line_and_field(tmp_path, reason):
    row, detail = BAD_ROWS[reason]
    # line 1 good, line 2 blank (skipped, still counted), line 3 good, line 4 the bad row
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, b"", GOOD, row, GOOD])
    data = data_config(tmp_path, [source("mine", path, format=Format.messages)])
    with pytest.raises(DataError) as e:
        check_sources(data, data.sources, tmp_path / "work")
    assert str(e.value) == f"source 'mine' {path}:4: {detail}"


def test_skip_counts_every_reason_and_keeps_the_good_rows(tmp_path):
    rows = [GOOD] + [BAD_ROWS[r][0] for r in sorted(BAD_ROWS)] + [GOOD]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = data_config(tmp_path, [source("mine", path, format=Format.messages)], on_bad_row=OnBadRow.skip,
                       max_bad_fraction=1.0)
    prepared = prepare(data, project_tok())
    assert prepared.manifest["bad_rows"] == {r: 1 for r in BAD_ROWS}
    assert prepared.manifest["sources"]["mine"]["available"] == 2
    assert prepared.manifest["num_documents"] == 2


def test_error_mode_reports_first_bad_row_before_any_tokenization(tmp_path, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before all sources were validated")

    monkeypatch.setattr(pipeline, "tokenize_batch", no_tokenizing)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_ROWS["unknown_role"][0], BAD_ROWS["bad_json"][0]])
    data = data_config(tmp_path, [source("good", good), source("bad", bad, format=Format.messages)])
    with pytest.raises(DataError, match=rf"^source 'bad' {bad}:2: field 'messages\[0\].role'.*\(2 bad rows in all; "):
        prepare(data, project_tok())
    assert not list(Path(data.cache_dir).glob("train-*")), "a failed prepare left a cache directory"


def test_parquet_bad_row_is_located_by_row_index(tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.Table.from_pylist(
        [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": None}, {"instruction": "x", "output": "y"}]
    )
    pq.write_table(table, path)
    data = data_config(tmp_path, [source("pq", path)])
    with pytest.raises(DataError) as e:
        check_sources(data, data.sources, tmp_path / "work")
    assert str(e.value) == f"source 'pq' {path} row 1: field 'output': missing or null"


# ---- adapters ---------------------------------------------------------------------------------

EXPECTED = [
    {"role": "system", "content": "Be exact.", "reasoning": None, "train": False},
    {"role": "user", "content": "What is 6 x 7?", "reasoning": None, "train": False},
    {"role": "assistant", "content": "42", "reasoning": "6 x 7 = 42.", "train": True},
]
ROWS = {
    Format.messages: {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "42", "reasoning": "6 x 7 = 42."}]},
    Format.sharegpt: {"conversations": [{"from": "system", "value": "Be exact."}, {"from": "human", "value": "What is 6 x 7?"}, {"from": "gpt", "value": "<think>\n6 x 7 = 42.\n</think>\n\n42"}]},
    Format.prompt_response: {"prompt": "What is 6 x 7?", "reasoning": "6 x 7 = 42.", "response": "42", "system": "Be exact."},
    Format.alpaca: {"instruction": "What is 6 x 7?", "input": "", "output": "<think>6 x 7 = 42.</think>42", "system": "Be exact."},
}


@pytest.mark.parametrize("fmt", list(ROWS), ids=lambda f: f.value)
def test_all_formats_give_the_same_conversation(fmt, tmp_path):
    assert to_conversation(ROWS[fmt], fmt, SourceConfig(name="s")) == EXPECTED
    # format: auto picks the same adapter from the columns
    path = write_jsonl(tmp_path / "one.jsonl", [ROWS[fmt]])
    rows = check_sources(data_config(tmp_path, [source("s", path)]), [source("s", path)], tmp_path / "w")[0].rows
    assert rows[0]["messages"] == EXPECTED


def test_alpaca_input_fields_prompt_list_and_system_prompt():
    src = SourceConfig(name="s", fields={"prompt": "input", "response": "output", "reasoning": None}, system_prompt="Sys.")
    row = {"input": [{"role": "user", "content": "Hi"}], "output": "Hello", "reasoning": "on"}
    assert to_conversation(row, Format.prompt_response, src) == [
        {"role": "system", "content": "Sys.", "reasoning": None, "train": False},
        {"role": "user", "content": "Hi", "reasoning": None, "train": False},
        {"role": "assistant", "content": "Hello", "reasoning": None, "train": True},
    ]
    alpaca = to_conversation({"instruction": "Sum", "input": "1 2", "output": "3"}, Format.alpaca, SourceConfig(name="s"))
    assert alpaca[0]["content"] == "Sum\n1 2"  # joined as LLaMA-Factory joins them
    raw = to_conversation(ROWS[Format.sharegpt], Format.sharegpt, SourceConfig(name="s", parse_think=False))
    assert raw[-1] == {"role": "assistant", "content": "<think>\n6 x 7 = 42.\n</think>\n\n42", "reasoning": None, "train": True}


def test_where_filters_rows_without_counting_them_bad(tmp_path):
    rows = [{**chat(answer=str(i)), "domain": "math" if i % 3 else "code"} for i in range(9)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    src = source("m", path, where={"domain": "math"})
    checked = check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w")[0]
    assert (len(checked.valid), checked.filtered, sum(checked.bad.values())) == (6, 3, 0)


def test_unknown_format_and_missing_files_are_clear(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "no chat here"}])
    with pytest.raises(DataError, match="cannot tell its format from columns \\['text'\\]; set `format`"):
        check_sources(data_config(tmp_path, [source("odd", path)]), [source("odd", path)], tmp_path / "w")
    missing = source("gone", tmp_path / "nope-*.jsonl")
    with pytest.raises(DataError, match="source 'gone': no file matches path"):
        check_sources(data_config(tmp_path, [missing]), [missing], tmp_path / "w")


def test_jsonl_split_across_processes_keeps_line_numbers(tmp_path, monkeypatch):
    from ouro_train.data import sources

    monkeypatch.setattr(sources, "JSONL_SHARD_BYTES", 300)  # many shards for two worker processes
    rows = [chat(f"row {i}", str(i)) for i in range(40)]
    rows[33] = BAD_ROWS["unknown_role"][0]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert len(sources._jsonl_shards(path, 300)) > 5
    data = data_config(tmp_path, [source("mine", path)], num_proc=2)
    with pytest.raises(DataError, match=rf"^source 'mine' {path}:34: field 'messages\[0\].role'"):
        check_sources(data, data.sources, tmp_path / "work")
    data.on_bad_row, data.max_bad_fraction = OnBadRow.skip, 0.05
    checked = check_sources(data, data.sources, tmp_path / "work2")[0]
    assert [m[0]["content"] for m in checked.rows.select(range(3))["messages"]] == ["row 0", "row 1", "row 2"]
    assert len(checked.valid) == 39 and checked.valid[33] == 34
