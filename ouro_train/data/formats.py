"""Format adapters: one source row -> a conversation, a list of {"role", "content", "reasoning", "train"}.

| format            | columns (defaults; renamed with the source's `fields`)                       |
|-------------------|-------------------------------------------------------------------------------|
| `messages`        | `messages`: [{`role`, `content`, `reasoning`?}]                               |
| `sharegpt`        | `conversations`: [{`from`, `value`}], `system`? (read only when `fields` names it) |
| `prompt_response` | `prompt` (a string or a list of messages), `response`, `reasoning`?, `system`? |
| `alpaca`          | `instruction`, `input`?, `output`, `system`?, `history`? ([prompt, response]s) |

Every format may also have a `tools` column (below). Roles are system, user, assistant and tool;
sharegpt's `from` also takes human, gpt, function_call (an assistant turn) and observation (a tool
turn), as LLaMA-Factory writes them. A source's `role_map` adds or overrides names.

Content is a string or a list of content parts: OpenAI's `{"type": "text", "text": ...}` or
LLaMA-Factory's `{"type": "text", "value": ...}`. Text parts are joined in order; `reasoning` parts
become the message's reasoning; any other part (image, audio) makes the row bad, since the model
reads text only. A message may carry a training flag as the peers write it (`loss_weight` 0/1,
`train` true/false, `weight` 0/1): an assistant turn flagged 0 is context, never supervised. Other
roles are never supervised, whatever their flag.

`reasoning` is the assistant's thinking; the chat renderer writes it as `<think>\\n{reasoning}\\n</think>\\n\\n`
before the answer. With `parse_think` (the default), an assistant content that begins with
`<think>...</think>` is split into reasoning and answer, so both spellings train the same tokens. After
that split a `<think>`/`</think>` left in an assistant's reasoning or answer (an unclosed, nested or
mid-text tag) makes the row bad: the tag would be trained as plain text. So does an empty or
whitespace-only answer (`allow_empty_answer` keeps one that has reasoning).

Tools (`tools`: a JSON string or a list of function definitions) are written into the system turn,
after its text (the source's system prompt, the row's, or the template's default):

    {system}\\n\\n# Tools\\n\\nYou may call these functions:\\n<tools>\\n{one JSON object per line}\\n</tools>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ouro_train.config import Format, SourceConfig
from ouro_train.data.chat import DEFAULT_SYSTEM, THINK_CLOSE, THINK_OPEN
from ouro_train.data.validate import (
    ROLES,
    BadRow,
    DataError,
    check_conversation,
    optional_text,
    require,
    require_list,
    require_text,
)

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip
TRAIN_FLAGS = ("loss_weight", "train", "weight")
TOOLS_HEADER = "\n\n# Tools\n\nYou may call these functions:\n<tools>\n"
DEFAULT_FIELDS = {
    Format.messages: {"messages": "messages"},
    Format.sharegpt: {"conversations": "conversations", "from": "from", "value": "value", "system": None},
    Format.prompt_response: {"prompt": "prompt", "response": "response", "reasoning": "reasoning", "system": "system"},
    Format.alpaca: {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
                    "history": "history"},
}


def detect_format(columns, source: str) -> Format:
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


def to_conversation(row: Any, fmt: Format, src: SourceConfig, allow_empty_answer: bool = False) -> list[dict]:
    """The row as a validated conversation; raises BadRow naming the offending field."""
    return RowReader(src, fmt, allow_empty_answer).read(row)


@dataclass
class RowReader:
    """Reads the rows of one source: its format, column names and role names."""

    src: SourceConfig
    fmt: Format
    allow_empty_answer: bool = False

    def __post_init__(self):
        self.fields = {"tools": "tools", **DEFAULT_FIELDS[self.fmt], **self.src.fields}
        builtin = SHAREGPT_ROLES if self.fmt == Format.sharegpt else {r: r for r in ROLES}
        self.roles = {**builtin, **self.src.role_map}

    def read(self, row: Any) -> list[dict]:
        if not isinstance(row, dict):
            raise BadRow("bad_type", f"expected a JSON object, got {type(row).__name__}")
        read_format = {
            Format.messages: self._messages,
            Format.sharegpt: self._sharegpt,
            Format.prompt_response: self._prompt_response,
            Format.alpaca: self._alpaca,
        }[self.fmt]
        messages, where = read_format(row)
        if self.src.system_prompt is not None:
            _add_system(messages, self.src.system_prompt)
        self._add_tools(row, messages)
        check_conversation(messages, where)
        return messages

    # ---- the formats ----------------------------------------------------------------------------

    def _messages(self, row: dict) -> tuple[list[dict], str]:
        key = self.fields["messages"]
        return self._message_list(require(row, key, key), key), key

    def _message_list(self, items: Any, key: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
        out = []
        for i, m in enumerate(require_list(items, key)):
            path = f"{key}[{i}]"
            role = self._role(require(m, role_key, f"{path}.{role_key}"), f"{path}.{role_key}")
            reasoning = optional_text(m, "reasoning", f"{path}.reasoning")
            out.append(self._turn(role, require(m, content_key, f"{path}.{content_key}"), reasoning,
                                  f"{path}.{content_key}", _train_flag(m, path)))
        if not out:
            raise BadRow("missing_field", "empty conversation", key)
        return out

    def _sharegpt(self, row: dict) -> tuple[list[dict], str]:
        key = self.fields["conversations"]
        messages = self._message_list(require(row, key, key), key, self.fields["from"], self.fields["value"])
        return self._with_system(row, messages), key

    def _prompt_response(self, row: dict) -> tuple[list[dict], str]:
        f = self.fields
        prompt = require(row, f["prompt"], f["prompt"])
        if isinstance(prompt, (list, tuple)):
            messages = self._message_list(prompt, f["prompt"])
        else:
            messages = [self._turn("user", require_text(prompt, f["prompt"]), None, f["prompt"])]
        reasoning = optional_text(row, f["reasoning"], f["reasoning"])
        messages.append(self._turn("assistant", require(row, f["response"], f["response"]), reasoning, f["response"]))
        return self._with_system(row, messages), f["response"]

    def _alpaca(self, row: dict) -> tuple[list[dict], str]:
        f = self.fields
        instruction = require_text(require(row, f["instruction"], f["instruction"]), f["instruction"])
        extra = optional_text(row, f["input"], f["input"])
        prompt = f"{instruction}\n{extra}" if extra else instruction  # as LLaMA-Factory joins them
        output = require(row, f["output"], f["output"])
        messages = self._history(row)
        messages += [self._turn("user", prompt, None, f["instruction"]), self._turn("assistant", output, None, f["output"])]
        return self._with_system(row, messages), f["output"]

    def _history(self, row: dict) -> list[dict]:
        """LLaMA-Factory's alpaca `history`: earlier [prompt, response] pairs, as turns before the row's."""
        key = self.fields["history"]
        out = []
        for i, pair in enumerate(require_list(row[key], key) if key is not None and row.get(key) is not None else []):
            path = f"{key}[{i}]"
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise BadRow("bad_type", "expected a [prompt, response] pair", path)
            out += [self._turn("user", pair[0], None, f"{path}[0]"), self._turn("assistant", pair[1], None, f"{path}[1]")]
        return out

    # ---- one message ----------------------------------------------------------------------------

    def _role(self, raw: Any, path: str) -> str:
        if isinstance(raw, str) and raw in self.roles:
            return self.roles[raw]
        raise BadRow("unknown_role", f"unknown role {raw!r} (known: {', '.join(self.roles)}; "
                                     "map other names with the source's `role_map`)", path)

    def _turn(self, role: str, content: Any, reasoning: Optional[str], path: str, train: bool = True) -> dict:
        text, part_reasoning = _text_and_reasoning(content, path)
        if part_reasoning is not None:
            if reasoning is not None:
                raise BadRow("bad_type", "reasoning given both as a field and as content parts", path)
            reasoning = part_reasoning
        if role != "assistant":
            return _message(role, text, reasoning, False)
        if self.src.parse_think and reasoning is None:
            text, reasoning = split_think(text)
        self._check_answer(text, reasoning, path)
        return _message(role, text, reasoning, train)

    def _check_answer(self, text: str, reasoning: Optional[str], path: str) -> None:
        """An assistant turn that would train on a broken reasoning trace or on nothing is a bad row."""
        if self.src.parse_think:
            if text.lstrip().startswith(THINK_OPEN) and THINK_CLOSE not in text:
                raise BadRow("unclosed_think", "<think> is never closed (a truncated reasoning trace?)", path)
            for where, value in (("answer", text), ("reasoning", reasoning or "")):
                tag = next((t for t in (THINK_OPEN, THINK_CLOSE) if t in value), None)
                if tag:
                    raise BadRow("stray_think_tag", f"{tag} inside the {where} (nested or mid-text reasoning tags)", path)
        if not text.strip() and not (self.allow_empty_answer and reasoning and reasoning.strip()):
            keep = " after its reasoning (data.allow_empty_answer=true keeps such replies)" if reasoning else ""
            raise BadRow("empty_answer", f"empty or whitespace-only answer{keep}", path)

    # ---- system turn and tools ------------------------------------------------------------------

    def _with_system(self, row: dict, messages: list[dict]) -> list[dict]:
        system = optional_text(row, self.fields["system"], self.fields["system"])
        if system:
            _add_system(messages, system)
        return messages

    def _add_tools(self, row: dict, messages: list[dict]) -> None:
        key = self.fields["tools"]
        value = None if key is None else row.get(key)
        tools = _tool_lines(value, key) if value is not None else ""
        if not tools:
            return
        _add_system(messages, DEFAULT_SYSTEM)
        messages[0]["content"] += f"{TOOLS_HEADER}{tools}\n</tools>"


def split_think(content: str) -> tuple[str, Optional[str]]:
    """(answer, reasoning) of a content that starts with <think>...</think>; else (content, None)."""
    stripped = content.lstrip()
    end = stripped.find(THINK_CLOSE)
    if not stripped.startswith(THINK_OPEN) or end < 0:
        return content, None
    return stripped[end + len(THINK_CLOSE) :].lstrip(), stripped[len(THINK_OPEN) : end].strip()


def _text_and_reasoning(content: Any, path: str) -> tuple[str, Optional[str]]:
    """A content string, or content parts -> (joined text parts, joined reasoning parts or None)."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, (list, tuple)):
        raise BadRow("non_string_content", f"expected a string or a list of content parts, got {type(content).__name__}", path)
    texts, reasoning = [], []
    for j, part in enumerate(content):
        at = f"{path}[{j}]"
        kind = require(part, "type", f"{at}.type")
        if kind not in ("text", "reasoning"):
            raise BadRow("unsupported_part", f"content part of type {kind!r}: only text and reasoning parts are trained on", f"{at}.type")
        key = "text" if part.get("text") is not None else "value"
        (texts if kind == "text" else reasoning).append(require_text(require(part, key, f"{at}.text"), f"{at}.{key}"))
    return "".join(texts), "".join(reasoning) if reasoning else None


def _train_flag(message: dict, path: str) -> bool:
    """Whether a message is trained on, from the first training flag it has (default: yes)."""
    for key in TRAIN_FLAGS:
        value = message.get(key)
        if value is None:
            continue
        if isinstance(value, str) or value not in (0, 1):
            raise BadRow("bad_type", f"expected 0 or 1 (false or true), got {value!r}", f"{path}.{key}")
        return bool(value)
    return True


def _tool_lines(value: Any, path: str) -> str:
    """Tool definitions (a JSON string, a list of objects, or one object) as one JSON object per line."""
    tools = value
    if isinstance(value, str):
        if not value.strip():
            return ""
        try:
            tools = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow("bad_json", f"bad JSON in the tool definitions: {e.msg} at column {e.colno}", path) from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("bad_type", "expected a list of tool definitions (JSON objects)", path)
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def _message(role: str, content: str, reasoning: Optional[str], train: bool) -> dict:
    return {"role": role, "content": content, "reasoning": reasoning, "train": train}


def _add_system(messages: list[dict], text: str) -> None:
    """A system turn first, unless the conversation already starts with one."""
    if messages[0]["role"] != "system":
        messages.insert(0, _message("system", text, None, False))
