"""Compiled layers under FlexAttention's document block mask, forward and backward: CUDA only (torch has
no FlexAttention backward on the CPU). Skipped without CUDA."""

import copy

import pytest
import torch

from conftest import tiny_model
from ouro_train.model import CHECKPOINT_GRANULARITIES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def forward_backward(model, ids, positions):
    out = model(ids, position_ids=positions, use_cache=False, compute_logits=False)
    loss = sum(h.pow(2).mean() for h in out.step_hidden_states) + out.gate_logits.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack(out.step_hidden_states).detach(), grads


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    eager = tiny_model(seed=3, max_position_embeddings=512).to(CUDA).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    return eager, compiled


@pytest.mark.parametrize("policy", CHECKPOINT_GRANULARITIES)
def test_compiled_layers_equal_eager_under_the_document_block_mask(models, policy):
    for model in models:
        model.set_activation_checkpointing(policy)
    eager, compiled = models
    for lengths in ([100, 200], [37, 129, 64, 70]):  # 300 tokens: a ragged last tile, boundaries inside tiles
        gen = torch.Generator().manual_seed(len(lengths))
        ids = torch.randint(3, 128, (1, sum(lengths)), generator=gen).to(CUDA)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(CUDA)
        plan = eager.model.attention_plans(1, ids.shape[1], 0, doc_ids=torch.repeat_interleave(
            torch.arange(len(lengths), device=CUDA), torch.tensor(lengths, device=CUDA))[None], device=CUDA)
        assert plan["full_attention"].kernel == "flex"
        (states, grads), (ref_states, ref_grads) = (forward_backward(compiled, ids, positions),
                                                    forward_backward(eager, ids, positions))
        torch.testing.assert_close(states, ref_states, rtol=1e-4, atol=1e-4 * float(ref_states.abs().max()))
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()), msg=name)
