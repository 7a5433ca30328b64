"""Per-recurrent-step evaluation against direct computations, and `ouro-eval`'s files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from conftest import REPO_ROOT, shared_path, tiny_model
from ouro_train.data.chat import ChatEncoder
from ouro_train.data.loader import collate
from ouro_train.data.validate import DataError
from ouro_train.eval import answer_tasks, evaluate_loss_per_step, final_answer, score_answers
from ouro_train.eval.cli import main as eval_cli
from ouro_train.eval.data import loss_batches, read_conversations
from ouro_train.export import export_model
from ouro_train.generation import Completion, GenerationSettings

VOCAB = 49152
MATH = REPO_ROOT / "data" / "samples" / "math.jsonl"
STEPS = [1, 2, 3, 5]  # the tiny model is trained-shaped for T = 3; 5 extrapolates


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shared_path("ouro-1.4b-files"))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=51, vocab_size=VOCAB)


@torch.no_grad()
def _direct(model, encoded, t):
    """Token-weighted CE of `model(ids, exit_at_step=t-1)` on the supervised tokens, and the exit pdf
    of a T = t forward, one conversation at a time."""
    loss = mean_step = tokens = 0.0
    for ids, supervised in encoded:
        ids = torch.from_numpy(ids).long()[None]
        out = model(ids, exit_at_step=t - 1, total_ut_steps=max(t, model.config.total_ut_steps), use_cache=False)
        scored = torch.from_numpy(supervised[1:])
        loss += F.cross_entropy(out.logits[0, :-1][scored].float(), ids[0, 1:][scored], reduction="sum").item()
        pdf = model(ids, total_ut_steps=t, use_cache=False).exit_pdf[0, :-1][scored]
        mean_step += (pdf * torch.arange(1, t + 1)).sum().item()
        tokens += int(scored.sum())
    return loss / tokens, mean_step / tokens, int(tokens)


def test_loss_per_step_equals_a_direct_computation(model, tokenizer):
    conversations = read_conversations(MATH, max_samples=5)
    encoded = ChatEncoder(tokenizer).encode_batch(conversations)
    result = evaluate_loss_per_step(model, loss_batches(conversations, tokenizer, batch_size=2, pad_id=0), STEPS)
    assert [row["ut_steps"] for row in result["per_step"]] == STEPS
    for row in result["per_step"]:
        loss, mean_step, tokens = _direct(model, encoded, row["ut_steps"])
        assert result["tokens"] == tokens
        assert row["loss"] == pytest.approx(loss, abs=1e-4)
        assert row["ppl"] == pytest.approx(np.exp(loss), rel=1e-3)
        assert row["exit_mean_step"] == pytest.approx(mean_step, abs=1e-5)
    assert result["per_step"][0]["exit_mean_step"] == 1.0 and result["per_step"][0]["exit_entropy"] == 0.0
    assert len({round(row["loss"], 6) for row in result["per_step"]}) == len(STEPS)


def test_packed_batches_give_the_same_numbers(model, tokenizer):
    """The trainer's packed micro-batches (position ids restarting per document) score like padded ones."""
    conversations = read_conversations(MATH, max_samples=4)
    encoded = ChatEncoder(tokenizer).encode_batch(conversations)
    row = (np.concatenate([ids for ids, _ in encoded]), np.concatenate([sup for _, sup in encoded]),
           np.array([len(ids) for ids, _ in encoded]))
    packed = evaluate_loss_per_step(model, [collate([row], packed=True)], [1, 3])
    padded = evaluate_loss_per_step(model, loss_batches(conversations, tokenizer, 4, pad_id=0), [1, 3])
    assert packed["tokens"] == padded["tokens"]
    for a, b in zip(packed["per_step"], padded["per_step"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["exit_entropy"] == pytest.approx(b["exit_entropy"], abs=1e-5)
    assert model.training is False


def test_final_answers():
    assert final_answer("The answer is 18.") == "18"
    assert final_answer("<think>\nthe answer is 5\n</think>\n\nThe answer is: 92 km.") == "92 km"
    assert final_answer("<think>\nThe answer is 5\n</think>\n\nno idea") is None
    assert final_answer("So the Answer is   42") == "42"
    tasks = answer_tasks(read_conversations(MATH, max_samples=3))
    assert [t.reference for t in tasks] == ["18", "92 km", "38"]
    assert tasks[0].prompt[-1] == {"role": "user", "content": tasks[0].prompt[-1]["content"], "reasoning": None,
                                   "train": False}


def test_accuracy_counts_matching_answers(monkeypatch):
    tasks = answer_tasks(read_conversations(MATH, max_samples=3))
    replies = [Completion("<think>\nx\n</think>\n\nThe answer is 18.", 10, 2.0, True),
               Completion("The answer is 93 km", 30, 3.0, True),
               Completion("The answer is: 38", 20, 1.0, True)]
    monkeypatch.setattr("ouro_train.eval.answers.complete_chats", lambda *args: replies)
    scores = score_answers(None, None, tasks, GenerationSettings())
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["mean_steps"] == pytest.approx((10 * 2 + 30 * 3 + 20 * 1) / 60)


def test_cli_writes_json_and_png(model, tokenizer, tmp_path):
    export = export_model(model, tmp_path / "export", tokenizer, dtype="fp32")
    out = tmp_path / "eval"
    eval_cli(["--model", str(export), "--data", str(MATH), "--out", str(out), "--ut-steps", "1,2,3,5",
              "--thresholds", "0.5,1.0", "--max-samples", "3", "--generate", "--max-new-tokens", "4"])
    result = json.loads((out / "eval.json").read_text())
    encoded = ChatEncoder(tokenizer).encode_batch(read_conversations(MATH, max_samples=3))
    for row in result["per_step"]:
        loss, mean_step, _ = _direct(model, encoded, row["ut_steps"])
        assert row["loss"] == pytest.approx(loss, abs=1e-4)
        assert row["exit_mean_step"] == pytest.approx(mean_step, abs=1e-5)
        assert row["mean_steps"] == row["ut_steps"] and 0.0 <= row["accuracy"] <= 1.0
    assert [r["threshold"] for r in result["per_threshold"]] == [0.5, 1.0]
    assert result["per_threshold"][1]["mean_steps"] == 3.0 > result["per_threshold"][0]["mean_steps"]
    assert result["trained_ut_steps"] == 3 and result["samples"] == 3 and result["generation"]["samples"] == 3
    png = (out / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    with pytest.raises(SystemExit, match="no conversation .* stated answer"):
        eval_cli(["--model", str(export), "--data", str(REPO_ROOT / "data" / "samples" / "chat.jsonl"),
                  "--out", str(tmp_path / "chat"), "--max-samples", "2", "--generate"])
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: field 'messages\[0\].role'"):
        eval_cli(["--model", str(export), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")])


def test_eval_data_is_read_and_validated_by_the_data_pipeline(tmp_path):
    bad = tmp_path / "held_out.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"held_out.jsonl:2: field 'messages\[0\].role': unknown role 'wizard'"):
        read_conversations(bad)
    code = read_conversations(REPO_ROOT / "data" / "samples" / "code.parquet", 2)
    assert len(code) == 2 and code[0][-1]["role"] == "assistant"  # Parquet and alpaca, like training data
