"""Final-answer accuracy: greedy (or sampled) completions scored against the reference answers.

A conversation has a reference answer when its final assistant message states one as
"The answer is: …" (or "The answer is …"). The model's answer is read the same way from the text
after its last `</think>`. Answers compare after normalisation (case, spacing, a trailing period).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ouro_train.generation.chat import GenerationSettings, complete_chats

_ANSWER = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)


@dataclass
class AnswerTask:
    prompt: list[dict]  # the conversation up to the final assistant turn
    reference: str  # normalised


def final_answer(text: str) -> str | None:
    """The normalised answer stated after the last `</think>` of `text`, or None."""
    matches = _ANSWER.findall(text.rsplit("</think>", 1)[-1])
    if not matches:
        return None
    return " ".join(matches[-1].split()).rstrip(".").strip().lower()


def answer_tasks(conversations: Sequence[Sequence[dict]]) -> list[AnswerTask]:
    tasks = []
    for messages in conversations:
        if messages[-1]["role"] != "assistant":
            continue
        reference = final_answer(messages[-1]["content"])
        if reference is not None:
            tasks.append(AnswerTask(list(messages[:-1]), reference))
    return tasks


def score_answers(model, tokenizer, tasks: Sequence[AnswerTask], settings: GenerationSettings, batch_size: int = 8,
                  generator: torch.Generator | None = None) -> dict:
    """{"accuracy", "mean_steps" (recurrent steps per generated token)} over `tasks`."""
    completions = complete_chats(model, tokenizer, [t.prompt for t in tasks], settings, batch_size, generator)
    correct = sum(final_answer(c.text) == t.reference for c, t in zip(completions, tasks))
    tokens = sum(c.num_tokens for c in completions)
    return {
        "accuracy": correct / len(tasks),
        "mean_steps": sum(c.mean_steps * c.num_tokens for c in completions) / max(tokens, 1),
    }
