"""Ouro's chat format (ChatML) rendered to token ids with an assistant-only supervision mask.

The text is exactly what Ouro's chat template produces (`tokenizer.apply_chat_template(messages,
tokenize=False)`): a default system turn `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`
when the first message is not a system message, then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
message. An assistant message with reasoning has the content

    <think>\\n{reasoning}\\n</think>\\n\\n{answer}

with `<think>` and `</think>` as their special ids (3 and 4 in Ouro's vocabulary).

The ids are built piece by piece, so the supervision boundaries are exact and special-token strings
inside message text (`<|im_end|>` typed by a user) stay plain text: text pieces go through a copy of
the tokenizer with `encode_special_tokens` set, which never matches added tokens. System and user
turns encode `"{role}\\n{content}"` as one piece, as whole-string tokenization does; an assistant turn
encodes its header `assistant\\n` apart from its content, as at generation time the prompt ends at the
header. The ids therefore equal `apply_chat_template(messages, tokenize=True)` for any conversation
whose assistant contents do not start with whitespace; one that does (" 42", "\n\nHi") gets its
content tokens as the model would generate them after the header, e.g. "Ġ" "4" "2" where the
whole string would merge the header's "\n" with the space ("ĊĠ").

Supervised (label = token) are the assistant content tokens, the `<think>` block, and the closing
`<|im_end|>`; not the `<|im_start|>assistant\\n` header, not the `\\n` after `<|im_end|>` (template glue
the model never has to generate: generation stops at `<|im_end|>`), not system, user or tool turns, and
not an assistant turn whose `train` is false (context only; `last_turn_only` supervises the last
trained one). Two options change that (`Supervision`):
  `train_on_prompt`  every token but the document's first `<|im_start|>` is supervised: system, user and
                     tool turns and the assistant headers too (LLaMA-Factory's `train_on_prompt`);
  `mask_turn_end`    false supervises the `\n` after a supervised assistant's `<|im_end|>`, as
                     LLaMA-Factory's ChatML templates do (their reply slot is `{content}<|im_end|>\n`).
The first token of a document is never supervised: in a packed row it would be a target predicted from
the previous document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from tokenizers import Tokenizer

IM_START, IM_END, THINK_OPEN, THINK_CLOSE = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
DEFAULT_SYSTEM = "You are a helpful assistant."

Piece = tuple[Union[int, str], bool]  # a special id or a text, and whether it is supervised


@dataclass(frozen=True)
class Supervision:
    """Which tokens beyond the assistant replies are supervised (the module docstring)."""

    last_turn_only: bool = False
    train_on_prompt: bool = False
    mask_turn_end: bool = True

    @classmethod
    def of(cls, data) -> "Supervision":
        """From a DataConfig."""
        return cls(data.last_turn_only, data.train_on_prompt, data.mask_turn_end)


class ChatEncoder:
    """Conversations -> (input_ids, supervised mask) in Ouro's chat format, for any tokenizer that has
    the ChatML special tokens (Ouro's, or the project tokenizer)."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END, THINK_OPEN, THINK_CLOSE) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {missing}")
        self.im_start, self.im_end = vocab[IM_START], vocab[IM_END]
        self.think_open, self.think_close = vocab[THINK_OPEN], vocab[THINK_CLOSE]
        self._spec = tokenizer.backend_tokenizer.to_str()
        self._text = _text_tokenizer(self._spec)
        self._fixed = self._fixed_pieces()
        self._special = {self.im_start: IM_START, self.im_end: IM_END}
        self._special.update({self.think_open: THINK_OPEN, self.think_close: THINK_CLOSE})

    def _fixed_pieces(self) -> dict[str, list[int]]:
        """The ids of the template's own text pieces, encoded once: a piece is encoded on its own
        either way, so these are the ids the batch call would give (about half the pieces of a turn)."""
        return {p: self._text.encode(p, add_special_tokens=False).ids for p in ("\n", "assistant\n", f"system\n{DEFAULT_SYSTEM}")}

    # A Tokenizer pickles without its encode_special_tokens flag: rebuild it in worker processes.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_text"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._text = _text_tokenizer(self._spec)

    def pieces(self, messages: Sequence[dict], last_turn_only: bool = False,
               supervision: Supervision | None = None) -> list[Piece]:
        sv = supervision or Supervision(last_turn_only)
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
        last = trained[-1] if trained else -1
        prompt = sv.train_on_prompt
        out: list[Piece] = []
        for i, m in enumerate(messages):
            out.append((self.im_start, prompt and i > 0))
            if m["role"] != "assistant":
                out += [(f"{m['role']}\n{m['content']}", prompt), (self.im_end, prompt), ("\n", prompt)]
                continue
            sup = m.get("train", True) and (i == last or not sv.last_turn_only)
            out.append(("assistant\n", prompt))
            content = m["content"]
            if m.get("reasoning") is not None:
                out += [(self.think_open, sup), (f"\n{m['reasoning']}\n", sup), (self.think_close, sup)]
                content = f"\n\n{content}"
            out += [(content, sup), (self.im_end, sup), ("\n", sup and not sv.mask_turn_end)]
        return out

    def render_text(self, messages: Sequence[dict]) -> str:
        """The conversation as text, as the chat template writes it."""
        return "".join(p if isinstance(p, str) else self._special[p] for p, _ in self.pieces(messages))

    def encode(self, messages: Sequence[dict], last_turn_only: bool = False,
               supervision: Supervision | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_batch([messages], last_turn_only, supervision)[0]

    def encode_batch(
        self, conversations: Sequence[Sequence[dict]], last_turn_only: bool = False,
        supervision: Supervision | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(input_ids int32, supervised bool)] per conversation."""
        if not conversations:
            return []
        ids, sup, lengths = self.encode_flat(conversations, last_turn_only, supervision)
        bounds = np.cumsum(lengths)[:-1]
        return list(zip(np.split(ids, bounds), np.split(sup, bounds)))

    def encode_flat(
        self, conversations: Sequence[Sequence[dict]], last_turn_only: bool = False,
        supervision: Supervision | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int32, supervised bool, tokens per conversation int64), the conversations' ids
        one after the other. All text pieces go through one batched encode call: `encode_batch`, not
        `encode_batch_fast`, which gives the same ids but takes about a quarter more CPU time with this
        tokenizer (tokenizers 0.23). The mask is built per piece, not per token."""
        all_pieces = [self.pieces(c, last_turn_only, supervision) for c in conversations]
        fixed = self._fixed
        texts = [p for pieces in all_pieces for p, _ in pieces if isinstance(p, str) and p and p not in fixed]
        encoded = iter(self._text.encode_batch(texts, add_special_tokens=False))
        ids: list[int] = []
        flags: list[bool] = []  # supervised, per piece
        runs: list[int] = []  # tokens, per piece
        lengths = np.zeros(len(all_pieces), dtype=np.int64)
        for i, pieces in enumerate(all_pieces):
            start = len(ids)
            for piece, supervised in pieces:
                if isinstance(piece, int):
                    ids.append(piece)
                    runs.append(1)
                elif piece:
                    piece_ids = fixed.get(piece) or next(encoded).ids
                    ids += piece_ids
                    runs.append(len(piece_ids))
                else:
                    continue
                flags.append(supervised)
            lengths[i] = len(ids) - start
        sup = np.repeat(np.array(flags, dtype=bool), np.array(runs, dtype=np.int64))
        return np.array(ids, dtype=np.int32), sup, lengths


def _text_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer for text pieces: never matches special tokens, never truncates or pads."""
    text = Tokenizer.from_str(spec)
    text.encode_special_tokens = True
    text.no_truncation()
    text.no_padding()
    return text
