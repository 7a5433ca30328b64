"""Format adapters: one source row -> a conversation, a list of {"role", "content", "reasoning"}.

| format            | columns (defaults; renamed with the source's `fields`)                       |
|-------------------|-------------------------------------------------------------------------------|
| `messages`        | `messages`: [{`role`, `content`, `reasoning`?}]                               |
| `sharegpt`        | `conversations`: [{`from`: human/user/gpt/assistant/system, `value`}]          |
| `prompt_response` | `prompt` (a string or a list of messages), `response`, `reasoning`?, `system`? |
| `alpaca`          | `instruction`, `input`?, `output`, `system`?                                  |

`reasoning` is the assistant's thinking; the chat renderer writes it as `<think>\\n{reasoning}\\n</think>\\n\\n`
before the answer. With `parse_think` (the default), an assistant content that begins with
`<think>...</think>` is split into reasoning and answer, so both spellings train the same tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from ouro_train.config import Format, SourceConfig
from ouro_train.data.validate import (
    BadRow,
    DataError,
    check_conversation,
    check_role,
    optional_text,
    require,
    require_list,
    require_text,
)
from ouro_train.data.chat import THINK_CLOSE, THINK_OPEN
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_FIELDS = {
    Format.messages: {"messages": "messages"},
    Format.sharegpt: {"conversations": "conversations"},
    Format.prompt_response: {"prompt": "prompt", "response": "response", "reasoning": "reasoning", "system": "system"},
    Format.alpaca: {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
}


def detect_format(columns: Iterable[str], source: str) -> Format:
    """The format a set of column names implies (for `format: auto`)."""
    cols = set(columns)
    if "messages" in cols:
        return Format.messages
    if "conversations" in cols:
        return Format.sharegpt
    if {"instruction", "output"} <= cols:
        return Format.alpaca
    if {"prompt", "response"} <= cols:
        return Format.prompt_response
    raise DataError(f"source '{source}': cannot tell its format from columns {sorted(cols)}; set `format`")


def to_conversation(row: Any, fmt: Format, src: SourceConfig) -> list[dict]:
    """The row as a validated conversation; raises BadRow naming the offending field."""
    if not isinstance(row, dict):
        raise BadRow("bad_type", f"expected a JSON object, got {type(row).__name__}")
    fields = {**DEFAULT_FIELDS[fmt], **src.fields}
    messages, where = ADAPTERS[fmt](row, fields)
    if src.system_prompt is not None:
        _add_system(messages, src.system_prompt)
    if src.parse_think:
        messages = [split_think(m) for m in messages]
    check_conversation(messages, where)
    return messages


def split_think(message: dict) -> dict:
    """An assistant message whose content starts with <think>...</think> -> reasoning + answer."""
    content = message["content"]
    if message["role"] != "assistant" or message["reasoning"] is not None:
        return message
    stripped = content.lstrip()
    end = stripped.find(THINK_CLOSE)
    if not stripped.startswith(THINK_OPEN) or end < 0:
        return message
    reasoning = stripped[len(THINK_OPEN) : end].strip()
    return _message("assistant", stripped[end + len(THINK_CLOSE) :].lstrip(), reasoning)


def _message(role: str, content: str, reasoning: Optional[str] = None) -> dict:
    return {"role": role, "content": content, "reasoning": reasoning}


def _messages(row: dict, fields: dict) -> tuple[list[dict], str]:
    key = fields["messages"]
    return _message_list(require_list(require(row, key, key), key), key), key


def _message_list(items: list, key: str) -> list[dict]:
    out = []
    for i, m in enumerate(items):
        path = f"{key}[{i}]"
        role = require(m, "role", f"{path}.role")
        check_role(role, f"{path}.role")
        content = require_text(require(m, "content", f"{path}.content"), f"{path}.content")
        out.append(_message(role, content, optional_text(m, "reasoning", f"{path}.reasoning")))
    if not out:
        raise BadRow("missing_field", "empty conversation", key)
    return out


def _sharegpt(row: dict, fields: dict) -> tuple[list[dict], str]:
    key = fields["conversations"]
    out = []
    for i, turn in enumerate(require_list(require(row, key, key), key)):
        path = f"{key}[{i}]"
        speaker = require(turn, "from", f"{path}.from")
        check_role(speaker, f"{path}.from", tuple(SHAREGPT_ROLES))
        value = require_text(require(turn, "value", f"{path}.value"), f"{path}.value")
        out.append(_message(SHAREGPT_ROLES[speaker], value))
    if not out:
        raise BadRow("missing_field", "empty conversation", key)
    return out, key


def _prompt_response(row: dict, fields: dict) -> tuple[list[dict], str]:
    prompt = require(row, fields["prompt"], fields["prompt"])
    if isinstance(prompt, (list, tuple)):
        messages = _message_list(list(prompt), fields["prompt"])
    else:
        messages = [_message("user", require_text(prompt, fields["prompt"]))]
    response = require_text(require(row, fields["response"], fields["response"]), fields["response"])
    reasoning = optional_text(row, fields["reasoning"], fields["reasoning"])
    messages.append(_message("assistant", response, reasoning))
    return _with_system(row, fields, messages), fields["response"]


def _alpaca(row: dict, fields: dict) -> tuple[list[dict], str]:
    instruction = require_text(require(row, fields["instruction"], fields["instruction"]), fields["instruction"])
    extra = optional_text(row, fields["input"], fields["input"])
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    output = require_text(require(row, fields["output"], fields["output"]), fields["output"])
    messages = [_message("user", prompt), _message("assistant", output)]
    return _with_system(row, fields, messages), fields["output"]


def _with_system(row: dict, fields: dict, messages: list[dict]) -> list[dict]:
    system = optional_text(row, fields["system"], fields["system"])
    if system:
        _add_system(messages, system)
    return messages


def _add_system(messages: list[dict], text: str) -> None:
    """A system turn first, unless the conversation already starts with one."""
    if messages[0]["role"] != "system":
        messages.insert(0, _message("system", text))


ADAPTERS: dict[Format, Callable[[dict, dict], tuple[list[dict], str]]] = {
    Format.messages: _messages,
    Format.sharegpt: _sharegpt,
    Format.prompt_response: _prompt_response,
    Format.alpaca: _alpaca,
}
