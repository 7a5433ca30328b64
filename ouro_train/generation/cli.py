"""`ouro-generate`: chat with an exported Ouro model, with compute-saving early exit.

    ouro-generate --model DIR --prompt "What is 2+2?"
    ouro-generate --model DIR --messages chat.json             # a JSON list of {"role", "content"}
    ouro-generate --model DIR --input in.jsonl --output out.jsonl
    ouro-generate --model DIR                                  # interactive chat (stdin is a terminal)

Each input line of `--input` holds `messages` (a chat) or `prompt` (one user turn); the output line is
the input with `completion` and `mean_steps` (recurrent steps per generated token) added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ouro_train.generation.chat import GenerationSettings, complete_chats, load_model, sampling_defaults
from ouro_train.generation.early_exit import KV_FILLS


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.output is not None and args.input is None:
        raise SystemExit("ouro-generate: --output goes with --input")
    if args.input is not None and args.output is None:
        raise SystemExit("ouro-generate: --input needs --output")
    interactive = args.interactive or (
        args.prompt is None and args.messages is None and args.input is None and sys.stdin.isatty()
    )
    if not interactive and args.prompt is None and args.messages is None and args.input is None:
        raise SystemExit("ouro-generate: give --prompt, --messages or --input (or --interactive)")

    sampling = sampling_defaults(args.model)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=sampling["temperature"] if args.temperature is None else args.temperature,
        top_p=sampling["top_p"] if args.top_p is None else args.top_p,
        exit_threshold=args.exit_threshold, ut_steps=args.ut_steps, kv_fill=args.kv_fill, think=args.think,
    )
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    if args.compile:
        model.compile_layers()
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    steps = settings.ut_steps or model.config.total_ut_steps

    def run(conversations):
        return complete_chats(model, tokenizer, conversations, settings, args.batch_size, generator)

    if interactive:
        _chat_loop(run, args.system, steps)
    elif args.input is not None:
        rows = _read_jsonl(args.input)
        completions = run([_conversation(row, args.system, f"{args.input}:{i}") for i, row in rows])
        with open(args.output, "w", encoding="utf-8") as f:
            for (_, row), c in zip(rows, completions):
                f.write(json.dumps({**row, "completion": c.text, "mean_steps": c.mean_steps}, ensure_ascii=False) + "\n")
        tokens = sum(c.num_tokens for c in completions)
        mean = sum(c.mean_steps * c.num_tokens for c in completions) / max(tokens, 1)
        print(f"wrote {len(completions)} completions to {args.output} ({tokens} tokens, "
              f"{mean:.2f} of {steps} recurrent steps per token)", file=sys.stderr)
    else:
        if args.prompt is not None:
            messages = _with_system([{"role": "user", "content": args.prompt}], args.system)
        else:
            messages = _with_system(_read_messages(args.messages), args.system)
        (c,) = run([messages])
        print(c.text)
        print(f"[{c.num_tokens} tokens, {c.mean_steps:.2f} of {steps} recurrent steps per token]", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-generate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="an exported model directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one user message")
    source.add_argument("--messages", type=Path, help="a JSON file: a list of messages, or {\"messages\": [...]}")
    source.add_argument("--input", type=Path, help="a jsonl file of {\"messages\"} or {\"prompt\"} rows")
    source.add_argument("--interactive", action="store_true", help="chat in the terminal")
    p.add_argument("--output", type=Path, help="where --input's completions go (jsonl)")
    p.add_argument("--system", help="a system message put first where a chat has none")
    p.add_argument("--think", action="store_true", help="open the assistant turn with <think> (Thinking models)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layer (pays off on GPU)")
    p.add_argument("--ut-steps", type=int, help="recurrent steps T (default: the model's total_ut_steps)")
    p.add_argument("--exit-threshold", type=float,
                   help="cumulative exit probability at which a token stops looping (default: the model's "
                        "early_exit_threshold; 1.0 runs every step)")
    p.add_argument("--kv-fill", choices=KV_FILLS, default="copy",
                   help="KV cache of the steps an exited token skips: its exit step's (copy) or the mean of "
                        "its computed steps' (average)")
    p.add_argument("--temperature", type=float,
                   help="0 = greedy (default: the model's generation_config.json, else the model card's 1.0)")
    p.add_argument("--top-p", type=float, help="default: the model's generation_config.json, else the card's 0.7")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: the export's dtype")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return p


def _chat_loop(run, system: str | None, steps: int) -> None:
    print(f"Chat with the model ({steps} recurrent steps). /reset clears the history, /exit or Ctrl-D quits.",
          file=sys.stderr)
    messages = _with_system([], system)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = _with_system([], system)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        (c,) = run([messages])
        messages.append({"role": "assistant", "content": c.text})
        print(f"ouro> {c.text}")
        print(f"[{c.num_tokens} tokens, {c.mean_steps:.2f} steps per token]", file=sys.stderr)


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def _read_messages(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    messages = data.get("messages") if isinstance(data, dict) else data
    _check_messages(messages, str(path))
    return messages


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                rows.append((number, json.loads(line)))
    if not rows:
        raise SystemExit(f"ouro-generate: {path} has no rows")
    return rows


def _conversation(row: dict, system: str | None, where: str) -> list[dict]:
    if isinstance(row.get("messages"), list):
        _check_messages(row["messages"], where)
        return _with_system(row["messages"], system)
    if isinstance(row.get("prompt"), str):
        return _with_system([{"role": "user", "content": row["prompt"]}], system)
    raise SystemExit(f"ouro-generate: {where}: a row needs `messages` (a list) or `prompt` (a string)")


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SystemExit(f"ouro-generate: {where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SystemExit(f"ouro-generate: {where}: message {i} needs string `role` and `content`")


if __name__ == "__main__":
    main()
