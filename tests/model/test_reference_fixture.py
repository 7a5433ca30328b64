"""Our model against outputs that the upstream remote code computed for a tiny random checkpoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import ouro_train  # noqa: F401  (registers the Auto classes)
from conftest import shared_path

TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return torch.load(shared_path("fixtures", "ouro_tiny_ref", "ref_outputs.pt"), weights_only=True)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    path = shared_path("fixtures", "ouro_tiny_ref")
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=request.param).eval()


def test_loads_through_auto_class_despite_auto_map(model):
    assert type(model).__name__ == "OuroForCausalLM" and type(model).__module__.startswith("ouro_train.")
    assert model.config.auto_map  # the checkpoint's config.json names upstream's remote code
    assert model.dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("step", [0, 1, 2])
def test_step_logits(model, ref, step):
    logits = model(ref["input_ids"], exit_at_step=step, use_cache=False).logits
    torch.testing.assert_close(logits, ref[f"logits_step{step}"], rtol=0, atol=TOL)
    # `use_cache=True` (upstream's default) must not change the numbers.
    cached = model(ref["input_ids"], exit_at_step=step).logits
    torch.testing.assert_close(cached, ref[f"logits_step{step}"], rtol=0, atol=TOL)


@torch.no_grad()
def test_expected_logits_loss(model, ref):
    out = model(ref["input_ids"], labels=ref["labels"], use_cache=False)
    torch.testing.assert_close(out.loss, ref["loss_expected_logits"], rtol=0, atol=TOL)


@torch.no_grad()
def test_threshold_exit_logits(model, ref):
    logits = model(ref["input_ids"], exit_threshold=0.6, use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits_exit_threshold_0.6"], rtol=0, atol=TOL)


@torch.no_grad()
def test_exit_pdf_and_step_states_from_one_pass(model, ref):
    out = model(ref["input_ids"], use_cache=False)
    torch.testing.assert_close(out.exit_pdf, ref["exit_pdf"], rtol=0, atol=TOL)
    assert len(out.step_hidden_states) == 3
    # Every step's hidden state gives that step's logits without another forward pass.
    for step, state in enumerate(out.step_hidden_states):
        torch.testing.assert_close(model.lm_head(state), ref[f"logits_step{step}"], rtol=0, atol=TOL)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation(model, ref, use_cache):
    out = model.generate(ref["greedy_prompt"], max_new_tokens=10, do_sample=False, use_cache=use_cache)
    assert torch.equal(out, ref["greedy_out"])


@torch.no_grad()
def test_generation_cache_has_one_slot_per_step_and_layer(model, ref):
    out = model.generate(ref["greedy_prompt"][:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert len(cache.layers) == model.config.num_hidden_layers * model.config.total_ut_steps
    # Slots of different steps hold different keys: each step has its own KV history.
    assert not torch.equal(cache.layers[0].keys, cache.layers[model.config.num_hidden_layers].keys)
    assert cache.get_seq_length() == ref["greedy_prompt"].shape[1] + 3 - 1
