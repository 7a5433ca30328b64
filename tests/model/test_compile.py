"""`compile_layers` (model.compile): the compiled decoder layer computes what the eager one does, forward
and backward, on plain causal rows and on packed rows under FlexAttention's document block mask, with
every activation-checkpointing policy the model offers."""

import copy
import shutil
import warnings

import pytest
import torch

from conftest import tiny_model
from ouro_train.model import CHECKPOINT_GRANULARITIES

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="torch inductor needs a C++ compiler (g++ or cc) on the CPU")


def forward_backward(model, ids, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns when it runs uncompiled on CPU
        out = model(ids, use_cache=False, compute_logits=False, **kwargs)
    loss = sum(h.pow(2).mean() for h in out.step_hidden_states) + out.gate_logits.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack(out.step_hidden_states).detach(), grads


def assert_same(got, ref):
    (states, grads), (ref_states, ref_grads) = got, ref
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5 * float(ref_states.abs().max()))
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():  # fp32 rounding of sums over T · L applications: relative to the largest entry
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_compiled_layers_equal_eager_forward_and_backward():
    torch._dynamo.reset()
    model = tiny_model().train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    eager = forward_backward(model, ids)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the counters outlive reset()
    model.compile_layers()
    assert_same(forward_backward(model, ids), eager)
    # One region compiled for every layer and step, not one graph per layer application.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= 2


@pytest.fixture(scope="module")
def models():
    """An eager model and a compiled copy with the same weights."""
    torch._dynamo.reset()
    eager = tiny_model(seed=3).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    return eager, compiled


def packed_rows(seed: int):
    """Two rows of documents whose boundaries differ per call (a new document mask every forward)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 40), generator=gen)
    cut = int(torch.randint(5, 35, (1,), generator=gen))
    positions = torch.stack([torch.cat([torch.arange(cut), torch.arange(40 - cut)]),
                             torch.cat([torch.arange(12), torch.arange(20), torch.arange(8)])])
    return ids, positions


@pytest.mark.parametrize("policy", CHECKPOINT_GRANULARITIES)
def test_compiled_layers_equal_eager_on_packed_rows_with_each_checkpointing_policy(models, policy):
    # On CPU packed rows attend through SDPA with the document mask (FlexAttention has no CPU backward).
    for model in models:
        model.config._attn_implementation = "sdpa"
        model.set_activation_checkpointing(policy)
    eager, compiled = models
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    graphs = []
    for seed in (0, 1):
        ids, positions = packed_rows(seed)
        assert_same(forward_backward(compiled, ids, position_ids=positions),
                    forward_backward(eager, ids, position_ids=positions))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # New boundaries reuse the compiled layer, and so does the recomputation of a checkpointed layer:
    # at most one new graph per policy (a selective policy compiles the layer with its checkpoint).
    assert graphs[1] == graphs[0] <= before + 1


@torch.no_grad()
def test_compiled_layers_equal_eager_under_flex_attentions_document_block_mask(models):
    # FlexAttention runs forward only on CPU; the compiled layer takes the block mask (tables and a
    # mask_mod closing over the row's document ids) as an input, so a new mask needs no new graph.
    for model in models:
        model.config._attn_implementation = "flex_attention"
        model.set_activation_checkpointing("none")
    eager, compiled = models
    graphs = None
    for seed in (0, 1, 2):
        ids, positions = packed_rows(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlexAttention warns when it runs uncompiled on CPU
            got = compiled(ids, position_ids=positions, use_cache=False, compute_logits=False)
            ref = eager(ids, position_ids=positions, use_cache=False, compute_logits=False)
        states, ref_states = torch.stack(got.step_hidden_states), torch.stack(ref.step_hidden_states)
        torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5 * float(ref_states.abs().max()))
        torch.testing.assert_close(got.gate_logits, ref.gate_logits, rtol=1e-5, atol=1e-5)
        if graphs is None:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
