"""`data.dataset_info` + `data.datasets`: a LLaMA-Factory dataset_info.json (its demo layout, in
llamafactory_demo/) read into sources, the conversations they give, and the entries refused."""

import json
import shutil
from pathlib import Path

import pytest
from data_helpers import project_tok

from conftest import run_in_process
from ouro_train.cli import prepare as prepare_cli
from ouro_train.config import DataConfig, Format
from ouro_train.data import DataError, prepare, split_sources
from ouro_train.data.dataset_info import dataset_info_sources
from ouro_train.data.pipeline import check_sources

DEMO = Path(__file__).parent / "llamafactory_demo"
INFO = str(DEMO / "dataset_info.json")


def conversations(tmp_path, name: str) -> list[list[dict]]:
    data = DataConfig(dataset_info=INFO, datasets=[name], cache_dir=str(tmp_path / "cache"))
    (checked,) = check_sources(data, split_sources(data, "train"), tmp_path / "work")
    return [[{k: m[k] for k in ("role", "content", "reasoning")} for m in row] for row in checked.rows["messages"]]


def turn(role, content, reasoning=None):
    return {"role": role, "content": content, "reasoning": reasoning}


def test_alpaca_entries_read_instruction_input_output(tmp_path):
    assert conversations(tmp_path, "alpaca_en_demo") == [
        [turn("user", "Name three primary colors."), turn("assistant", "Red, yellow and blue.")],
        [turn("user", "Translate the sentence into French.\nThe cat sleeps."), turn("assistant", "Le chat dort.")],
        [turn("user", "Add the numbers.\n2 and 3"), turn("assistant", "5")],
    ]
    identity = conversations(tmp_path, "identity")
    assert identity[1] == [turn("user", "Who are you?"), turn("assistant", "I am {{name}}, an AI assistant developed by {{author}}.")]


def test_sharegpt_tool_calls_keep_their_roles_and_tools(tmp_path):
    (conv,) = conversations(tmp_path, "glaive_toolcall_en_demo")
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv[0]["content"].startswith("You are a helpful assistant.\n\n# Tools\n\n")
    assert '"name": "get_weather"' in conv[0]["content"]
    assert conv[2]["content"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert conv[4]["content"] == "It is 18 degrees in Paris."


def test_sharegpt_tags_and_system_column(tmp_path):
    rows = conversations(tmp_path, "thinking_demo")
    assert rows[0] == [turn("system", "Answer briefly."), turn("user", "What is 6 times 7?"),
                       turn("assistant", "42", "6 times 7 is 42.")]
    assert rows[1] == [turn("system", "You are terse."), turn("user", "Capital of Italy?"), turn("assistant", "Rome.")]


def test_entries_map_to_sources():
    by_name = {s.name: s for s in dataset_info_sources(INFO, ["alpaca_en_demo", "thinking_demo", "alpaca_en",
                                                              "ultrachat_200k", "adgen_train", "belle_en"], "data.datasets")}
    local = by_name["alpaca_en_demo"]
    assert (local.path, local.format, local.hf_id) == (str(DEMO / "alpaca_en_demo.json"), Format.alpaca, None)
    assert local.fields == {"instruction": "instruction", "input": "input", "output": "output", "history": None,
                            "system": None, "tools": None}
    thinking = by_name["thinking_demo"]
    assert thinking.count == 2 and thinking.format == Format.sharegpt
    assert thinking.fields == {"conversations": "messages", "system": "system", "tools": None, "from": "role",
                               "value": "content"}
    assert thinking.role_map == {"user": "user", "assistant": "assistant", "observation": "tool",
                                 "function_call": "assistant", "system": "system"}
    hub = by_name["alpaca_en"]
    assert (hub.hf_id, hub.hf_name, hub.split, hub.path) == ("llamafactory/alpaca_en", None, "train", None)
    assert (by_name["ultrachat_200k"].hf_id, by_name["ultrachat_200k"].split) == ("HuggingFaceH4/ultrachat_200k", "train_sft")
    assert by_name["ultrachat_200k"].fields["from"] == "role"
    assert by_name["adgen_train"].fields["instruction"] == "content" and by_name["adgen_train"].fields["output"] == "summary"
    assert (by_name["belle_en"].hf_name, by_name["belle_en"].count) == ("en", 1000)


@pytest.mark.parametrize("name, message", [
    ("mllm_demo", "entry 'mllm_demo': columns.images: images are not supported"),
    ("dpo_en_demo", "entry 'dpo_en_demo': ranking: preference data"),
    ("deepctrl", "entry 'deepctrl': ms_hub_url: only Hugging Face hub datasets"),
    ("no_such_entry", "data.datasets: no entry 'no_such_entry' in"),
])
def test_what_cannot_be_mapped_is_refused_by_entry_and_key(name, message):
    with pytest.raises(DataError, match=message):
        dataset_info_sources(INFO, [name], "data.datasets")


def test_unknown_keys_and_local_splits_are_refused(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"a": {"file_name": "a.json", "colums": {}},
                                "b": {"file_name": "b.json", "split": "test"},
                                "c": {"file_name": "c.json", "formatting": "openai"},
                                "d": {"file_name": "d.json", "formatting": "sharegpt", "tags": {"speaker_tag": "x"}},
                                "e": {"file_name": "e.json", "columns": {"answer": "output"}}}))
    for name, message in [("a", "entry 'a': colums: not a dataset_info.json key"), ("b", "entry 'b': split: 'test'"),
                          ("c", "entry 'c': formatting: 'openai'"), ("d", "entry 'd': tags.speaker_tag"),
                          ("e", "entry 'e': columns.answer: not a dataset_info.json column")]:
        with pytest.raises(DataError, match=message):
            dataset_info_sources(str(tmp_path), [name], "data.eval_datasets")  # a folder: its dataset_info.json


def test_ouro_prepare_reads_the_named_entries(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    args = ["--config-name", "smoke", "data.sources=[]", f"data.dataset_info={demo}/dataset_info.json",
            "data.datasets=[identity,alpaca_en_demo,thinking_demo]", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_in_process(monkeypatch, prepare_cli, *args) == 0
    out = capsys.readouterr().out
    for name, kept in (("identity", 2), ("alpaca_en_demo", 3), ("thinking_demo", 2)):
        assert any(line.split()[:1] == [name] and line.split()[3] == str(kept) for line in out.splitlines()), out
    refused = args[:4] + ["data.datasets=[mllm_demo]", args[-1]]
    assert run_in_process(monkeypatch, prepare_cli, *refused) == 1
    assert "entry 'mllm_demo': columns.images" in capsys.readouterr().err


def test_prepared_tokens_are_the_chat_encoding(tmp_path):
    data = DataConfig(dataset_info=INFO, datasets=["alpaca_en_demo"], pack=False, shuffle=False, max_seq_len=256,
                      cache_dir=str(tmp_path / "cache"))
    prepared = prepare(data, project_tok(), log=lambda _: None)
    from ouro_train.data import ChatEncoder

    rows = conversations(tmp_path, "alpaca_en_demo")
    encoder = ChatEncoder(project_tok())
    for r, conv in enumerate(rows):  # shuffle=false, no packing: row r is the file's row r
        ids, sup, _ = prepared[r]
        ref_ids, ref_sup = encoder.encode(conv)
        assert ids.tolist() == ref_ids.tolist() and sup.tolist() == ref_sup.tolist()
