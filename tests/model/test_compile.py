"""`compile_layers` (model.compile=true): the compiled decoder layer computes what the eager one does."""

import shutil

import pytest
import torch

from conftest import tiny_model

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="torch inductor needs a C++ compiler (g++ or cc) on the CPU")


def forward_backward(model, ids):
    out = model(ids, use_cache=False, compute_logits=False)
    loss = sum(h.pow(2).mean() for h in out.step_hidden_states) + out.gate_logits.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack(out.step_hidden_states).detach(), grads


def test_compiled_layers_equal_eager_forward_and_backward():
    torch._dynamo.reset()
    model = tiny_model().train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    eager_states, eager_grads = forward_backward(model, ids)
    model.compile_layers()
    states, grads = forward_backward(model, ids)
    torch.testing.assert_close(states, eager_states, rtol=1e-5, atol=1e-5 * float(eager_states.abs().max()))
    for name, grad in eager_grads.items():  # fp32 rounding of sums over T · L applications: relative to the largest entry
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
    # One region compiled for every layer and step, not one graph per layer application.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
