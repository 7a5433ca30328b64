"""Chat generation around `generate_early_exit`: loading an export, prompts from the tokenizer's chat
template, stop tokens, batching, and decoding completions.

Ouro's chat format is ChatML; turns end with `<|im_end|>` while the tokenizer's own eos is
`<|endoftext|>`, so generation stops at either. The Thinking models do not open a reasoning block by
themselves: `think=True` appends `<think>\\n` after the `<|im_start|>assistant\\n` header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ouro_train.data.chat import IM_END, THINK_OPEN
from ouro_train.generation.early_exit import generate_early_exit

END_OF_TEXT = "<|endoftext|>"
THINKING_PROMPT = THINK_OPEN + "\n"  # the generation prompt of thinking mode, as the chat template writes it
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The model card's sampling: what an export's generation_config.json carries and ouro-generate falls back to.
CARD_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 0.7}


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = CARD_SAMPLING["temperature"]  # 0 = greedy
    top_p: float = CARD_SAMPLING["top_p"]
    exit_threshold: float | None = None  # None: the model's config.early_exit_threshold
    ut_steps: int | None = None  # recurrent steps T; None: the model's config.total_ut_steps
    kv_fill: str = "copy"  # KV of the steps an early-exited token skips: "copy" | "average"
    think: bool = False  # open the assistant turn with "<think>\n"


@dataclass
class Completion:
    text: str  # the assistant turn as generated (starting with "<think>\n" when think), without the stop token
    num_tokens: int
    mean_steps: float  # recurrent steps per generated token
    stopped: bool  # ended at a stop token (else at max_new_tokens)


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) from an export directory, in eval mode on `device` (CUDA when available);
    `dtype` "auto" keeps the export's dtype."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not auto or one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES.get(dtype, "auto")).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template")
    return model, tokenizer


def sampling_defaults(model_dir: str | Path) -> dict:
    """`temperature` and `top_p` from the model's generation_config.json (`do_sample: false` is greedy,
    temperature 0); a key the file does not set is the model card's."""
    path = Path(model_dir) / "generation_config.json"
    written = json.loads(path.read_text()) if path.is_file() else {}
    sampling = {key: written.get(key, card) for key, card in CARD_SAMPLING.items()}
    return {"temperature": sampling["temperature"] if sampling["do_sample"] else 0.0, "top_p": sampling["top_p"]}


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[<|im_end|>, <|endoftext|>]: the ends of an assistant turn and of a document."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_END, END_OF_TEXT) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {missing} that end a chat turn")
    return [vocab[IM_END], vocab[END_OF_TEXT]]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], think: bool = False) -> list[int]:
    """Token ids of `messages` rendered by the chat template, ending with the assistant header.

    A message's optional `reasoning` is written the way training renders it:
    `<think>\\n{reasoning}\\n</think>\\n\\n{content}`.
    """
    rendered = [
        {"role": m["role"], "content": m["content"] if m.get("reasoning") is None
         else f"<think>\n{m['reasoning']}\n</think>\n\n{m['content']}"}
        for m in messages
    ]
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    if think:
        text += THINKING_PROMPT
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def complete_chats(
    model,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict]],
    settings: GenerationSettings,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
) -> list[Completion]:
    """One assistant completion per conversation, generated in left-padded batches."""
    stops = stop_token_ids(tokenizer)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else stops[-1]
    completions: list[Completion] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c, settings.think) for c in conversations[start : start + batch_size]]
        ids, mask = _left_pad(prompts, pad, model.device)
        out = generate_early_exit(
            model, ids, mask, max_new_tokens=settings.max_new_tokens, exit_threshold=settings.exit_threshold,
            total_ut_steps=settings.ut_steps, kv_fill=settings.kv_fill, temperature=settings.temperature,
            top_p=settings.top_p, stop_token_ids=tuple(stops), pad_token_id=pad, generator=generator,
        )
        for tokens, steps in zip(out.new_tokens.tolist(), out.steps.tolist()):
            length = sum(1 for s in steps if s > 0)
            tokens, steps = tokens[:length], steps[:length]
            stopped = bool(tokens) and tokens[-1] in stops
            text = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=False)
            completions.append(Completion(
                text=(THINKING_PROMPT if settings.think else "") + text,
                num_tokens=length,
                mean_steps=sum(steps) / max(length, 1),
                stopped=stopped,
            ))
    return completions


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)
