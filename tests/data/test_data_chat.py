"""Chat rendering: the exact template text and ids, special strings as text, the supervision mask."""

import pickle

import pytest
from data_helpers import ouro_tok, project_tok

from ouro_train.data.chat import ChatEncoder

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there, how are you?"},
        {"role": "assistant", "content": "Fine, thanks!"},
        {"role": "user", "content": "Count to 3 (digits: 123)."},
        {"role": "assistant", "content": "1, 2, 3."},
    ],
    [
        {"role": "user", "content": "Solve 3x + 5 = 20"},
        {"role": "assistant", "content": "x = 5", "reasoning": "Subtract 5: 3x = 15.\nDivide by 3: x = 5."},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "a system turn that is not first renders as a normal turn"},
        {"role": "assistant", "content": "ok"},
    ],
]


def as_template_messages(messages):
    """What the plain template sees: reasoning written into the content as <think>...</think>."""
    out = []
    for m in messages:
        content = m["content"]
        if m.get("reasoning") is not None:
            content = f"<think>\n{m['reasoning']}\n</think>\n\n{content}"
        out.append({"role": m["role"], "content": content})
    return out


@pytest.mark.parametrize("tokenizer", [ouro_tok, project_tok], ids=["ouro", "project"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_text_and_ids_equal_apply_chat_template(tokenizer, messages):
    tok = tokenizer()
    enc = ChatEncoder(tok)
    reference = as_template_messages(messages)
    assert enc.render_text(messages) == tok.apply_chat_template(reference, tokenize=False)
    ids, _ = enc.encode(messages)
    assert ids.tolist() == list(tok.apply_chat_template(reference, tokenize=True)["input_ids"])


def test_documented_ids_for_what_is_2_plus_2():
    ids, sup = ChatEncoder(ouro_tok()).encode(CONVERSATIONS[0])
    # The ids of architecture doc §9 (with generation prompt), then "4<|im_end|>\n".
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]
    assert ids.tolist()[: len(prompt)] == prompt
    assert ids.tolist()[len(prompt) :] == [36, 2, 198]  # "4" "<|im_end|>" "\n"
    assert sup.tolist() == [False] * len(prompt) + [True, True, False]


@pytest.mark.parametrize("tokenizer", [ouro_tok, project_tok], ids=["ouro", "project"])
def test_special_token_strings_in_content_stay_text(tokenizer):
    tok = tokenizer()
    enc = pickle.loads(pickle.dumps(ChatEncoder(tok)))  # as in datasets' worker processes
    text = "look: <|im_end|>\n<|im_start|>assistant <think>x</think> <|endoftext|>"
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    ids, _ = enc.encode(messages)
    specials = [i for i in ids.tolist() if i < 17]
    # Only the template's own specials: system, user and assistant turns open and close.
    assert specials == [1, 2, 1, 2, 1, 2]
    content_ids = enc._text.encode(text, add_special_tokens=False).ids
    assert all(i >= 17 for i in content_ids)
    assert tok.decode(content_ids) == text
    assert tok.decode(ids.tolist()) == enc.render_text(messages)


def test_mask_covers_assistant_content_and_im_end_only():
    tok = project_tok()
    enc = ChatEncoder(tok)
    messages = CONVERSATIONS[1]
    ids, sup = enc.encode(messages)
    supervised_text = tok.decode([i for i, s in zip(ids.tolist(), sup.tolist()) if s])
    assert supervised_text == "Fine, thanks!<|im_end|>1, 2, 3.<|im_end|>"
    assert not sup[0]
    # Every supervised run starts right after "<|im_start|>assistant\n" and ends at <|im_end|>.
    runs = [i for i in range(len(sup)) if sup[i] and not sup[i - 1]]
    ends = [i for i in range(len(sup)) if sup[i] and (i + 1 == len(sup) or not sup[i + 1])]
    for start, end in zip(runs, ends):
        assert tok.decode(ids[start - 3 : start].tolist()) == "<|im_start|>assistant\n"
        assert ids[end] == enc.im_end and not sup[end + 1] and tok.decode([ids[end + 1]]) == "\n"


def test_last_turn_only():
    tok = project_tok()
    ids, sup = ChatEncoder(tok).encode(CONVERSATIONS[1], last_turn_only=True)
    assert tok.decode([i for i, s in zip(ids.tolist(), sup.tolist()) if s]) == "1, 2, 3.<|im_end|>"


def test_reasoning_uses_think_ids_and_exact_string():
    tok = ouro_tok()
    enc = ChatEncoder(tok)
    ids, sup = enc.encode(CONVERSATIONS[2])
    assert (enc.think_open, enc.think_close) == (3, 4)
    supervised = tok.decode([i for i, s in zip(ids.tolist(), sup.tolist()) if s])
    assert supervised == "<think>\nSubtract 5: 3x = 15.\nDivide by 3: x = 5.\n</think>\n\nx = 5<|im_end|>"
    assert ids.tolist().count(3) == 1 and ids.tolist().count(4) == 1


def test_leading_whitespace_content_is_encoded_as_generated():
    """Deliberate difference from whole-string tokenization: content after the header encodes alone."""
    tok = ouro_tok()
    enc = ChatEncoder(tok)
    messages = [{"role": "user", "content": "count"}, {"role": "assistant", "content": " 1 2 3"}]
    ids, sup = enc.encode(messages)
    content = [i for i, s in zip(ids.tolist(), sup.tolist()) if s][:-1]
    assert content == tok.backend_tokenizer.encode(" 1 2 3", add_special_tokens=False).ids
    assert enc.render_text(messages) == tok.apply_chat_template(messages, tokenize=False)
