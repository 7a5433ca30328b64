"""Cached decoding: left-padded batches, cache continuation and per-call recurrent steps."""

import pytest
import torch

from conftest import assert_instances_agree, tiny_model
from ouro_train.model import OuroCache

NEW_TOKENS = 8


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("exit_kwargs", [{}, {"exit_at_step": 2}, {"exit_threshold": 0.5}])
def test_left_padded_batch_equals_each_row_alone(implementation, exit_kwargs):
    model = tiny_model(seed=7, attn_implementation=implementation)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (4, 9, 2)]
    ids, mask = _left_pad(prompts)
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **exit_kwargs
    )
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               **exit_kwargs)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(prompt) :]), f"row {i} diverged"


@torch.no_grad()
def test_cached_equals_uncached_greedy():
    model = tiny_model(seed=8)
    prompt = torch.randint(3, 128, (2, 6))
    cached = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    uncached = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_multi_token_forward_on_a_filled_cache(implementation):
    """Chunked prefill: the second chunk's logits equal those of one full forward."""
    model = tiny_model(seed=9, attn_implementation=implementation)
    ids = torch.randint(3, 128, (2, 14))
    full = model(ids, use_cache=False, exit_at_step=2).logits
    first = model(ids[:, :9], use_cache=True, exit_at_step=2)
    second = model(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True, exit_at_step=2)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=0, atol=1e-5)
    assert second.past_key_values.get_seq_length() == 14


@torch.no_grad()
@pytest.mark.parametrize("steps", range(1, 9))
def test_any_number_of_recurrent_steps_runs(steps):
    """T = 1..8 per call (the paper extrapolates a T=4 model to 8), cached and not."""
    model = tiny_model(seed=10)
    ids = torch.randint(3, 128, (1, 7))
    out = model(ids, total_ut_steps=steps, use_cache=False)
    assert out.exit_pdf.shape == (1, 7, steps) and len(out.step_hidden_states) == steps
    torch.testing.assert_close(out.exit_pdf.sum(-1), torch.ones(1, 7), rtol=0, atol=1e-6)
    generated = model.generate(ids, total_ut_steps=steps, max_new_tokens=3, do_sample=False, eos_token_id=None,
                               return_dict_in_generate=True)
    assert len(generated.past_key_values.layers) == steps * model.config.num_hidden_layers
    uncached = model.generate(ids, total_ut_steps=steps, max_new_tokens=3, do_sample=False, eos_token_id=None,
                              use_cache=False)
    assert torch.equal(generated.sequences, uncached)


@torch.no_grad()
def test_per_call_steps_equal_a_model_built_with_those_steps():
    model = tiny_model(seed=11, total_ut_steps=3)
    ids = torch.randint(3, 128, (1, 7))
    built = tiny_model(seed=11, total_ut_steps=5)
    assert_instances_agree(model(ids, total_ut_steps=5).logits, built(ids).logits)


@torch.no_grad()
def test_filled_cache_with_too_few_slots_is_an_error():
    model = tiny_model(seed=12)
    ids = torch.randint(3, 128, (1, 5))
    cache = model(ids, use_cache=True, total_ut_steps=2).past_key_values
    assert isinstance(cache, OuroCache) and len(cache.layers) == 4
    with pytest.raises(ValueError, match="needs 6"):
        model(ids[:, :1], past_key_values=cache, total_ut_steps=3)


@torch.no_grad()
def test_output_hidden_states_does_not_crash():
    model = tiny_model(seed=13)
    out = model(torch.randint(3, 128, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 1 + model.config.total_ut_steps
    with pytest.raises(ValueError, match="output_attentions"):
        model(torch.randint(3, 128, (1, 5)), output_attentions=True)
