"""`ouro-generate` and the chat layer: prompts from the chat template, batches, jsonl in/out, the chat loop."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import shared_path, tiny_model
from ouro_train.export import export_model
from ouro_train.generation import GenerationSettings, complete_chats, load_model, prompt_ids
from ouro_train.generation.cli import main as generate_cli

VOCAB = 49152


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))
    return export_model(tiny_model(seed=41, vocab_size=VOCAB), tmp_path_factory.mktemp("gen") / "export", tokenizer,
                        dtype="fp32")


def test_prompt_ids_follow_the_chat_template(export_dir):
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    # the rendering of the architecture note (section 9), ending with the assistant header
    expected = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2,
                198, 1, 520, 9531, 198]
    assert prompt_ids(tokenizer, messages) == expected
    assert prompt_ids(tokenizer, messages, think=True) == expected + [3, 198]
    with_reasoning = messages + [{"role": "assistant", "content": "4", "reasoning": "2+2=4"},
                                 {"role": "user", "content": "And 3+3?"}]
    text = tokenizer.decode(prompt_ids(tokenizer, with_reasoning))
    assert "<|im_start|>assistant\n<think>\n2+2=4\n</think>\n\n4<|im_end|>" in text


@torch.no_grad()
def test_batched_chat_completions_equal_hf_greedy_generation(export_dir):
    model, tokenizer = load_model(export_dir, device="cpu")
    chats = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Name three colours, please."}]]
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    completions = complete_chats(model, tokenizer, chats, settings, batch_size=2)
    for chat, completion in zip(chats, completions):
        ids = torch.tensor([prompt_ids(tokenizer, chat)])
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[2, 0])[0, ids.shape[1] :]
        stopped = int(expected[-1]) in (2, 0)
        assert completion.stopped == stopped
        assert completion.text == tokenizer.decode(expected[:-1] if stopped else expected)
        assert completion.mean_steps == model.config.total_ut_steps and completion.num_tokens == len(expected)


def test_prompt_and_jsonl_modes(export_dir, tmp_path, capsys):
    generate_cli(["--model", str(export_dir), "--prompt", "Hi there", "--max-new-tokens", "5", "--temperature", "0",
                  "--exit-threshold", "0.5"])
    out = capsys.readouterr()
    assert out.out.strip() and "recurrent steps per token" in out.err

    rows = [{"messages": [{"role": "user", "content": "What is 3+4?"}]}, {"prompt": "Say hi", "id": 7}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    generate_cli(["--model", str(export_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
                  str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--think", "--ut-steps", "5", "--seed", "3"])
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k not in ("completion", "mean_steps")} for w in written] == rows
    assert all(w["completion"].startswith("<think>\n") and w["mean_steps"] == 5.0 for w in written)

    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no chat here"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: a row needs `messages`"):
        generate_cli(["--model", str(export_dir), "--input", str(tmp_path / "bad.jsonl"), "--output",
                      str(tmp_path / "o.jsonl")])


def test_interactive_chat_keeps_the_history(export_dir, monkeypatch, capsys):
    lines = iter(["Hello", "", "How are you?", "/reset", "Bye"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    seen = []

    def recording_complete_chats(model, tokenizer, chats, *args):
        seen.append([list(c) for c in chats])
        return complete_chats(model, tokenizer, chats, *args)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("ouro_train.generation.cli.complete_chats", recording_complete_chats)
    generate_cli(["--model", str(export_dir), "--interactive", "--max-new-tokens", "3", "--system", "Be brief."])
    assert [len(chats[0]) for chats in seen] == [2, 4, 2]  # system + turns; /reset starts over
    assert seen[1][0][2]["role"] == "assistant"
    assert capsys.readouterr().out.count("ouro> ") == 3


def test_export_loads_with_hf_generate_defaults(export_dir):
    """The generation config makes plain `generate` stop at <|im_end|>."""
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert 2 in model.generation_config.eos_token_id


@pytest.mark.parametrize("written, flags, expected", [
    ({}, [], (1.0, 0.7)),  # the export's own file: the model card's sampling
    ({"temperature": 0.6, "top_p": 0.9}, [], (0.6, 0.9)),
    ({"do_sample": False}, [], (0.0, 0.7)),
    ({"temperature": 0.6}, ["--temperature", "0.2", "--top-p", "0.5"], (0.2, 0.5)),
])
def test_sampling_defaults_come_from_generation_config(export_dir, tmp_path, monkeypatch, written, flags, expected):
    model_dir = tmp_path / "model"
    shutil.copytree(export_dir, model_dir)
    config_file = model_dir / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **written}))
    used = []

    def recording_complete_chats(model, tokenizer, chats, settings, *args):
        used.append((settings.temperature, settings.top_p))
        return complete_chats(model, tokenizer, chats, settings, *args)

    monkeypatch.setattr("ouro_train.generation.cli.complete_chats", recording_complete_chats)
    generate_cli(["--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "1", *flags])
    assert used == [expected]
