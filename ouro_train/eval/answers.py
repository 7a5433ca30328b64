"""Final answers: where a completion states one, and whether it equals the reference.

The answer is read from the text after the completion's last `</think>`; a completion that opened a
think block and never closed it has no answer (it was cut off while reasoning), and one without think
tags is read whole. Two kinds of answer:

    math    the content of the last `\\boxed{…}` (nested braces kept), else the last "The answer is …"
    choice  a letter A-D: `\\boxed{C}` (also `\\boxed{\\text{(C)}}`), else the last "Answer: C" /
            "the answer is (C)", else the last "(C)"

Math answers are compared by math-verify: both sides are parsed into sympy (LaTeX or plain
expressions), so `\\frac12` equals `0.5`, `2\\sqrt{2}` equals `\\sqrt{8}`, `x=3` equals `3`, `\\{1,2\\}`
equals `\\{2,1\\}`, and units and degree signs are dropped. Where neither side parses (a name, a word)
the normalised strings must be equal. Choice answers are equal letters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch
from math_verify import parse, verify

from ouro_train.data.formats import THINK_CLOSE, THINK_OPEN
from ouro_train.generation.chat import GenerationSettings, complete_chats

CHOICE_LETTERS = "ABCD"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_STATED = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_LETTER = rf"[{CHOICE_LETTERS}]"
_STATED_LETTER = re.compile(rf"(?i:answer)(?:\s+is)?\s*:?\s*\**\s*\(?({_LETTER})\)?(?![A-Za-z])")
_PARENTHESISED_LETTER = re.compile(rf"\(({_LETTER})\)")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


class AnswerKind(Enum):
    math = "math"
    choice = "choice"


@dataclass
class Verdict:
    extracted: str | None  # the answer read from the completion; None: it states none
    correct: bool


def answer_region(text: str) -> str | None:
    """The part of a completion where its final answer is: after the last `</think>`."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    return None if text.lstrip().startswith(THINK_OPEN) else text


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`) in `text` whose braces close; None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str, kind: AnswerKind = AnswerKind.math) -> str | None:
    """The final answer `text` states, as a string (math) or a letter (choice); None if it states none."""
    region = answer_region(text)
    if region is None:
        return None
    if kind is AnswerKind.choice:
        return _choice(region)
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed
    stated = _STATED.findall(region)
    return _strip_delimiters(_normalise(stated[-1])) if stated else None


def is_equivalent(prediction: str, reference: str) -> bool:
    """Whether a math answer equals the reference (math-verify; string equality where neither parses)."""
    gold, target = _parse_math(reference), _parse_math(prediction)
    if gold and target:
        return bool(verify(gold, target))
    return _normalise(_strip_delimiters(prediction)).lower() == _normalise(_strip_delimiters(reference)).lower()


def check_answer(completion: str, reference: str, kind: AnswerKind = AnswerKind.math) -> Verdict:
    extracted = extract_answer(completion, kind)
    if extracted is None:
        return Verdict(None, False)
    if kind is AnswerKind.choice:
        return Verdict(extracted, extracted == reference.strip().upper())
    return Verdict(extracted, is_equivalent(extracted, reference))


def _choice(region: str) -> str | None:
    boxed = last_boxed(region)
    if boxed is not None:
        letter = re.fullmatch(rf"\(?({_LETTER})\)?\.?", _TEXT_COMMAND.sub(r"\1", boxed).replace(" ", ""))
        if letter:
            return letter.group(1)
    for pattern in (_STATED_LETTER, _PARENTHESISED_LETTER):
        found = pattern.findall(region)
        if found:
            return found[-1]
    return None


def _parse_math(answer: str) -> list:
    return parse(f"${_strip_delimiters(answer)}$")


def _strip_delimiters(answer: str) -> str:
    """`$…$`, `\\(…\\)` and `\\[…\\]` around an answer removed (the caller wraps it once for parsing)."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


def _normalise(answer: str) -> str:
    return " ".join(answer.split()).rstrip(".").strip()


# ---- problems and their accuracy ------------------------------------------------------------------


@dataclass
class Problem:
    id: str
    prompt: list[dict]  # the conversation to complete
    reference: str  # the math answer, or the letter of the correct option
    kind: AnswerKind = AnswerKind.math


def final_answer(text: str) -> str | None:
    """The math answer stated after the last `</think>` of `text`, or None."""
    return extract_answer(text, AnswerKind.math)


def answer_tasks(conversations: Sequence[Sequence[dict]]) -> list[Problem]:
    """A problem per conversation whose final assistant message states an answer: the conversation up to
    that message, and the answer (the held-out chat data of `ouro-eval --generate` and the `chat` benchmark)."""
    tasks = []
    for messages in conversations:
        if messages[-1]["role"] != "assistant":
            continue
        reference = final_answer(messages[-1]["content"])
        if reference is not None:
            tasks.append(Problem(str(len(tasks)), list(messages[:-1]), reference))
    return tasks


def score_answers(model, tokenizer, problems: Sequence[Problem], settings: GenerationSettings, batch_size: int = 8,
                  generator: torch.Generator | None = None) -> dict:
    """{"accuracy", "mean_steps" (recurrent steps per generated token)} of one completion per problem."""
    completions = complete_chats(model, tokenizer, [p.prompt for p in problems], settings, batch_size, generator)
    correct = sum(check_answer(c.text, p.reference, p.kind).correct for c, p in zip(completions, problems))
    tokens = sum(c.num_tokens for c in completions)
    return {
        "accuracy": correct / len(problems),
        "mean_steps": sum(c.mean_steps * c.num_tokens for c in completions) / max(tokens, 1),
    }
