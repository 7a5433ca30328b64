"""Files as other tools write them: JSON arrays, BOMs and CRLF, content parts, training flags, tools and
roles. Each accepted spelling must give exactly the tokens and masks of the equivalent plain `messages` row."""

import json

import numpy as np
import pytest
from data_helpers import chat, data_config, project_tok, source, write_jsonl

from ouro_train.config import Format, OnBadRow, SourceConfig
from ouro_train.data import ChatEncoder, DataError, prepare
from ouro_train.data.formats import to_conversation
from ouro_train.data.pipeline import check_sources
from ouro_train.data.validate import BadRow

SYSTEM_DEFAULT = "You are a helpful assistant."
WEATHER_TOOL = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


def prepared(tmp_path, tag: str, path, **kw):
    """(tokens, supervised) of a file prepared alone, one document per row, in a fresh cache."""
    data = data_config(tmp_path / tag, [source("s", path, **kw)], pack=False, max_seq_len=4096)
    p = prepare(data, project_tok(), log=lambda _: None)
    return np.asarray(p.tokens), np.asarray(p.supervised)


def assert_same_as_messages(tmp_path, path, messages_rows, **kw):
    reference = write_jsonl(tmp_path / "reference.jsonl", [{"messages": m} for m in messages_rows])
    got, want = prepared(tmp_path, "got", path, **kw), prepared(tmp_path, "want", reference)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def write_json(path, value, **kw):
    path.write_text(json.dumps(value, indent=2, **kw))
    return path


def check_row(messages: list, **src_kw) -> list:
    """The validated conversations of one messages row, through the source reader."""
    return [to_conversation({"messages": messages}, Format.messages, SourceConfig(name="s", **src_kw))]


# ---- files --------------------------------------------------------------------------------------


def test_llamafactory_alpaca_json_array(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "input": "", "output": "Hello!", "system": "Be warm."},
        {"instruction": "And times 2?", "input": "", "output": "10", "history": [["Add 2 and 3.", "5"]]},
    ]
    path = write_json(tmp_path / "alpaca_demo.json", rows)
    assert_same_as_messages(tmp_path, path, [
        [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "system", "content": "Be warm."}, {"role": "user", "content": "Say hello."},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And times 2?"}, {"role": "assistant", "content": "10"}],
    ])


def test_llamafactory_sharegpt_tool_calls_json_array(tmp_path):
    """glaive_toolcall-style rows: function_call / observation turns and a `tools` JSON string."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": '{"temp_c": 18}'},
            {"from": "gpt", "value": "It is 18 °C in Paris."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    path = write_json(tmp_path / "toolcall_demo.json", [row])
    tools_system = (f"{SYSTEM_DEFAULT}\n\n# Tools\n\nYou may call these functions:\n<tools>\n"
                    f"{json.dumps(WEATHER_TOOL, ensure_ascii=False)}\n</tools>")
    assert_same_as_messages(tmp_path, path, [[
        {"role": "system", "content": tools_system},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ]])


def test_bom_and_crlf(tmp_path):
    rows = [chat("one", "1"), chat("two", "2", reasoning="counting")]
    lines = b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows)
    (tmp_path / "win.jsonl").write_bytes(lines)
    assert_same_as_messages(tmp_path, tmp_path / "win.jsonl", [r["messages"] for r in rows])
    array = b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode()
    (tmp_path / "win.json").write_bytes(array)
    assert_same_as_messages(tmp_path, tmp_path / "win.json", [r["messages"] for r in rows])


def test_json_array_bad_element_is_named_by_line_and_item(tmp_path):
    path = write_json(tmp_path / "rows.json", [chat(), chat(), {"messages": [{"role": "user", "content": None}]}])
    line = [i for i, text in enumerate(path.read_text().splitlines(), 1) if text == "  {"][2]
    with pytest.raises(DataError) as e:
        check_sources(data_config(tmp_path, [source("a", path)]), [source("a", path)], tmp_path / "w")
    assert str(e.value) == f"source 'a' {path}:{line} (item 2): field 'messages[0].content': missing or null"


def test_malformed_json_array_stops_naming_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": \n]\n')
    with pytest.raises(DataError, match=rf"^source 'a' {path}:4: bad JSON array: Expecting value at column 1 \(item 1\)$"):
        check_sources(data_config(tmp_path, [source("a", path)]), [source("a", path)], tmp_path / "w")


# ---- content parts and flags ----------------------------------------------------------------------


def test_openai_content_parts_and_llamafactory_reasoning_parts(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be exact."}]},
                      {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "6 x 7?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "42"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "And 2 + 2?"}]},
                      {"role": "assistant", "content": [{"type": "reasoning", "value": "Two pairs."},
                                                        {"type": "text", "value": "4"}]}]},
    ]
    path = write_jsonl(tmp_path / "parts.jsonl", rows)
    assert_same_as_messages(tmp_path, path, [
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 6 x 7?"},
         {"role": "assistant", "content": "42"}],
        [{"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "4", "reasoning": "Two pairs."}],
    ])


@pytest.mark.parametrize("flag", [{"loss_weight": 0}, {"train": False}, {"weight": 0}], ids=lambda f: next(iter(f)))
def test_assistant_turn_flagged_zero_is_context(flag):
    """Same tokens as the unflagged conversation; the mask of its last turn only."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! Ask away."},
             {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    flagged = [dict(m) for m in turns]
    flagged[1].update(flag)
    (conversation,) = check_row(flagged)
    encoder = ChatEncoder(project_tok())
    ids, sup = encoder.encode(conversation)
    ref_ids, ref_sup = encoder.encode(turns, last_turn_only=True)
    assert np.array_equal(ids, ref_ids) and np.array_equal(sup, ref_sup) and sup.any()


# ---- roles ----------------------------------------------------------------------------------------


def test_tool_turns_render_as_the_template_does_and_are_never_supervised():
    tok = project_tok()
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": '{"name": "w"}'},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    (conversation,) = check_row(messages)
    encoder = ChatEncoder(tok)
    assert encoder.render_text(conversation) == tok.apply_chat_template(messages, tokenize=False)
    ids, sup = encoder.encode(conversation)
    start = tok.encode("<|im_start|>tool\nsunny<|im_end|>\n")
    at = next(i for i in range(len(ids)) if list(ids[i : i + len(start)]) == start)
    assert not sup[at : at + len(start)].any() and sup[at + len(start) :].any()


def test_role_map_maps_names_and_unknown_roles_name_the_option(tmp_path):
    rows = [{"conversations": [{"from": "asker", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]
    path = write_jsonl(tmp_path / "odd.jsonl", rows)
    src = source("s", path, role_map={"asker": "user", "bot": "assistant"})
    checked = check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w")[0]
    assert [(m["role"], m["content"]) for m in checked.rows[0]["messages"]] == [("user", "Hi"), ("assistant", "Hello")]
    with pytest.raises(DataError, match=rf"{path}:1: field 'conversations\[0\].from': unknown role 'asker' .*`role_map`"):
        check_sources(data_config(tmp_path, [source("s", path)]), [source("s", path)], tmp_path / "w2")


def test_config_errors_name_the_dotted_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat()])
    bad_role = data_config(tmp_path, [source("s", path, role_map={"bot": "robot"})])
    with pytest.raises(DataError, match=r"^data.sources\[0\].role_map.bot: 'robot' is not one of system, user, assistant, tool$"):
        prepare(bad_role, project_tok())
    with pytest.raises(DataError, match=r"^data.max_bad_fraction must be in \[0, 1\], got 1.5$"):
        prepare(data_config(tmp_path, [source("s", path)], max_bad_fraction=1.5), project_tok())
    with pytest.raises(DataError, match=r"^data.sources\[0\].max_bad_fraction must be in \[0, 1\], got -0.1$"):
        prepare(data_config(tmp_path, [source("s", path, max_bad_fraction=-0.1)]), project_tok())


# ---- reasoning checks -------------------------------------------------------------------------------

BROKEN_REASONING = {
    "nested": ("<think>a <think>b</think> c</think>4", "stray_think_tag", "</think> inside the answer"),
    "close_only": ("2 + 2 is 4.</think>\n\n4", "stray_think_tag", "</think> inside the answer"),
    "mid_text": ("The answer: <think>hmm</think> 4", "stray_think_tag", "<think> inside the answer"),
    "truncated": ("<think>\nFirst, 2 + 2", "unclosed_think", "<think> is never closed"),
    "think_only": ("<think>2 + 2 = 4</think>\n\n", "empty_answer", "empty or whitespace-only answer after its reasoning"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_REASONING))
def test_broken_reasoning_is_a_bad_row_with_its_reason(tmp_path, case):
    answer, reason, detail = BROKEN_REASONING[case]
    path = write_jsonl(tmp_path / "r.jsonl", [chat(), chat(answer=answer)])
    src = source("s", path)
    with pytest.raises(DataError) as e:
        check_sources(data_config(tmp_path, [src]), [src], tmp_path / "w")
    assert str(e.value).startswith(f"source 's' {path}:2: field 'messages[1].content': {detail}")
    checked = check_sources(data_config(tmp_path, [src], on_bad_row=OnBadRow.skip, max_bad_fraction=0.5), [src], tmp_path / "w2")
    assert checked[0].bad == {reason: 1}


def test_reasoning_field_plus_think_in_content_is_a_stray_tag():
    with pytest.raises(BadRow, match="<think> inside the answer"):
        check_row([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>y", "reasoning": "z"}])


def test_allow_empty_answer_keeps_think_only_replies(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [chat(answer="<think>2 + 2 = 4</think>")])
    src = source("s", path)
    (checked,) = check_sources(data_config(tmp_path, [src], allow_empty_answer=True), [src], tmp_path / "w")
    assert checked.rows[0]["messages"][-1] == {"role": "assistant", "content": "", "reasoning": "2 + 2 = 4", "train": True}
