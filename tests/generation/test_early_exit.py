"""Compute-saving early exit during cached decoding."""

import pytest
import torch

from conftest import tiny_model
from ouro_train.generation import generate_early_exit
from ouro_train.generation.early_exit import _next_token
from ouro_train.model import threshold_exit_steps

NEW = 10


def _left_padded(seed: int, lengths=(5, 9, 3)):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids, mask = torch.zeros(len(prompts), width, dtype=torch.long), torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return prompts, ids, mask


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("threshold", [None, 1.0])
def test_threshold_one_gives_the_tokens_of_full_computation(seed, dtype, threshold):
    model = tiny_model(seed=seed).to(dtype)
    _, ids, mask = _left_padded(seed)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    out = generate_early_exit(model, ids, mask, max_new_tokens=NEW, exit_threshold=threshold)
    # Token ids, not logits: one instance, and argmax is far from ulp-level ties on these models.
    assert torch.equal(out.sequences, expected)
    assert out.mean_steps == model.config.total_ut_steps


@torch.no_grad()
def test_the_rounding_exit_at_threshold_one_is_exercised():
    """In bf16 a cumulative exit mass >= 0.998 rounds to 1.0, so at threshold 1.0 many tokens read out
    an earlier step (upstream's rule): the test above checks that the readout follows that rule while
    every step still runs."""
    model = tiny_model(seed=0).to(torch.bfloat16)
    _, ids, mask = _left_padded(0)
    sequences = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1]:])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    pdf = model(sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).exit_pdf
    readout = threshold_exit_steps(pdf[:, ids.shape[1] - 1 : -1], 1.0)
    assert (readout < model.config.total_ut_steps - 1).sum() >= 10


@torch.no_grad()
@pytest.mark.parametrize("kv_fill", ["copy", "average"])
def test_lower_thresholds_run_fewer_steps(kv_fill):
    model = tiny_model(seed=1)
    _, ids, mask = _left_padded(1)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for layer in model.model.layers]
    means = {}
    for threshold in (0.3, 0.6, 1.0):
        calls.clear()
        out = generate_early_exit(model, ids, mask, max_new_tokens=NEW, exit_threshold=threshold, kv_fill=kv_fill)
        means[threshold] = out.mean_steps
        # compute really saved: decoding layer calls process exactly the rows still looping
        decoded_rows = sum(c for c in calls[model.config.total_ut_steps * len(model.model.layers):])
        assert decoded_rows == len(model.model.layers) * int(out.steps[:, 1:].sum())
    for hook in hooks:
        hook.remove()
    assert means[0.3] < means[1.0] == model.config.total_ut_steps
    assert means[0.6] < means[1.0]


@torch.no_grad()
@pytest.mark.parametrize("threshold", [0.4, 0.8])
def test_batched_rows_equal_each_row_alone(threshold):
    model = tiny_model(seed=3)
    prompts, ids, mask = _left_padded(3)
    batched = generate_early_exit(model, ids, mask, max_new_tokens=NEW, exit_threshold=threshold)
    for i, prompt in enumerate(prompts):
        alone = generate_early_exit(model, prompt[None], max_new_tokens=NEW, exit_threshold=threshold)
        assert torch.equal(batched.new_tokens[i], alone.new_tokens[0])
        assert torch.equal(batched.steps[i], alone.steps[0])


@torch.no_grad()
def test_first_decoded_token_exits_where_the_model_rule_says():
    """The first decoded token sees full-depth caches, so its exit step is the model's own Q-exit step."""
    model = tiny_model(seed=1)
    prompts, ids, mask = _left_padded(1, lengths=(6, 6, 6))
    for threshold in (0.3, 0.6, 0.9):
        out = generate_early_exit(model, ids, max_new_tokens=2, exit_threshold=threshold)
        pdf = model(out.sequences[:, :-1], use_cache=False).exit_pdf[:, -1]
        assert torch.equal(out.steps[:, 1], threshold_exit_steps(pdf, threshold) + 1)


@torch.no_grad()
@pytest.mark.parametrize("kv_fill", ["copy", "average"])
def test_kv_of_skipped_steps_is_filled(kv_fill):
    model = tiny_model(seed=1)
    _, ids, mask = _left_padded(1)
    out = generate_early_exit(model, ids, mask, max_new_tokens=NEW, exit_threshold=0.5, kv_fill=kv_fill)
    cache, steps, layers = out.cache, model.config.total_ut_steps, len(model.model.layers)
    prompt_len = ids.shape[1]
    early = 0
    for row in range(ids.shape[0]):
        for i in range(1, out.steps.shape[1]):  # token i came out of the forward of position prompt_len + i - 1
            depth, pos = int(out.steps[row, i]), prompt_len + i - 1
            if depth in (0, steps):
                continue
            early += 1
            for layer in range(layers):
                for store in (cache.keys, cache.values):
                    computed = [store[s * layers + layer][row, :, pos] for s in range(depth)]
                    fill = computed[-1] if kv_fill == "copy" else torch.stack(computed).mean(0)
                    for s in range(depth, steps):
                        assert torch.equal(store[s * layers + layer][row, :, pos], fill)
                    if kv_fill == "average" and depth > 1:
                        assert not torch.equal(fill, computed[-1])
    assert early > 0
    assert all(k.shape[-2] == prompt_len + out.steps.shape[1] - 1 for k in cache.keys)


@torch.no_grad()
def test_rows_stop_at_a_stop_token():
    model = tiny_model(seed=4)
    _, ids, mask = _left_padded(4)
    free = generate_early_exit(model, ids, mask, max_new_tokens=NEW)
    stop = int(free.new_tokens[0, 3])
    out = generate_early_exit(model, ids, mask, max_new_tokens=NEW, stop_token_ids=(stop,), pad_token_id=0)
    for row in range(ids.shape[0]):
        hits = (free.new_tokens[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else NEW
        assert torch.equal(out.new_tokens[row, :end], free.new_tokens[row, :end])
        assert (out.new_tokens[row, end:] == 0).all() and (out.steps[row, end:] == 0).all()
        assert (out.steps[row, :end] > 0).all()


def test_sampling_is_nucleus_sampling():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 2000)
    assert torch.equal(_next_token(logits, 0.0, 0.7, None), torch.ones(2000, dtype=torch.long))
    gen = torch.Generator().manual_seed(0)
    drawn = _next_token(logits, 1.0, 0.7, gen)
    # probabilities 0.09, 0.67, 0.24, 0.03: the nucleus of mass 0.7 is {1, 2}, renormalised
    assert set(drawn.tolist()) == {1, 2}
    share = (drawn == 1).float().mean()
    assert abs(share - 0.67 / 0.91) < 0.04
    assert torch.equal(_next_token(logits[:5], 1.0, 1e-9, gen), torch.ones(5, dtype=torch.long))
