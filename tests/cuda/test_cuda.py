"""What only a CUDA GPU can check (`pytest -m cuda`; `bench/gpu_check.sh` runs these first). Skipped
without CUDA."""

import json
import os

import pytest
import torch

from conftest import HANG_GUARD_S, tiny_config, tiny_model
from ouro_train.config import DeepSpeedConfig, ObjectiveConfig, OptimConfig
from ouro_train.model import OuroForCausalLM
from ouro_train.train.memory import StepShape, step_memory
from ouro_train.train.objectives import compute_objective

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def packed_batch(seq: int, vocab: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(3, vocab, (1, seq), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions, ids.masked_fill(positions == 0, -100)


def objective_loss(model, ids, positions, labels):
    out = model(ids, position_ids=positions, use_cache=False, compute_logits=False)
    result = compute_objective(ObjectiveConfig(), out, labels, model.get_output_embeddings())
    return result.loss_sum / result.num_tokens


def test_bf16_loss_is_within_tolerance_of_the_fp32_reference():
    model = tiny_model(vocab_size=512, hidden_size=128, intermediate_size=352, max_position_embeddings=1024)
    batch = packed_batch(512, 512, [200, 312])
    reference = float(objective_loss(model, *batch))
    gpu = model.to(CUDA, torch.bfloat16)
    loss = float(objective_loss(gpu, *(t.to(CUDA) for t in batch)))
    assert loss == pytest.approx(reference, rel=2e-2)


def test_flex_document_mask_forward_and_backward_equal_each_document_alone():
    model = tiny_model(max_position_embeddings=512).to(CUDA).train()
    lengths = [100, 156]
    ids, positions, labels = (t.to(CUDA) for t in packed_batch(256, model.config.vocab_size, lengths))
    plan = model.model.attention_plans(1, 256, 0, doc_ids=torch.repeat_interleave(
        torch.arange(2, device=CUDA), torch.tensor(lengths, device=CUDA))[None], device=CUDA)
    assert plan["full_attention"].kernel == "flex"
    packed = model(ids, position_ids=positions, use_cache=False, compute_logits=False)
    sum(h.float().pow(2).sum() for h in packed.step_hidden_states).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    start, alone = 0, []
    for n in lengths:
        out = model(ids[:, start:start + n], use_cache=False, compute_logits=False)
        sum(h.float().pow(2).sum() for h in out.step_hidden_states).backward()
        alone.append(out.step_hidden_states[-1])
        start += n
    torch.testing.assert_close(packed.step_hidden_states[-1], torch.cat(alone, dim=1), rtol=1e-4, atol=1e-4)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-3, atol=1e-4, msg=name)


def deepspeed_engine(model, stage: int):
    import deepspeed

    from ouro_train.train.engine import build_ds_config, init_distributed, param_groups

    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    init_distributed()
    ds = build_ds_config(DeepSpeedConfig(zero_stage=stage, stage3_param_persistence_threshold=0), OptimConfig(lr=1e-3),
                         micro_batch=1, grad_accum=1, world_size=1)
    engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    return engine, optimizer


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_step_with_torch_fused_adamw_lowers_the_loss(stage):
    torch.manual_seed(0)
    engine, optimizer = deepspeed_engine(OuroForCausalLM(tiny_config(vocab_size=512)).to(torch.bfloat16), stage)
    basic = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the optimizer DeepSpeed built
    assert type(basic) is torch.optim.AdamW and basic.defaults["fused"]  # no JIT-built op: no nvcc needed
    assert all(p.is_cuda for group in basic.param_groups for p in group["params"])
    batch = [t.to(CUDA) for t in packed_batch(128, 512, [64, 64])]
    losses = []
    for _ in range(4):
        loss = objective_loss(engine, *batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


def test_early_exit_generation_gives_the_tokens_of_the_cpu():
    from ouro_train.generation import generate_early_exit

    model = tiny_model().float()
    prompt = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    on_cpu = generate_early_exit(model, prompt, max_new_tokens=8, exit_threshold=0.6)
    on_gpu = generate_early_exit(model.to(CUDA), prompt.to(CUDA), max_new_tokens=8, exit_threshold=0.6)
    assert torch.equal(on_gpu.sequences.cpu(), on_cpu.sequences)


def test_metrics_record_mfu_and_peak_memory(tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = dict(os.environ, DS_ACCELERATOR="cuda", WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # `python -m ouro_train.train`: the GPU box runs the repository from PYTHONPATH, without console scripts
    command = [sys.executable, "-m", "ouro_train.train", "--config-name", "smoke", f"output_dir={tmp_path}",
               f"data.cache_dir={tmp_path / 'cache'}", "max_steps=3", "export_at_end=false", "wandb.mode=disabled"]
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split", "train") == "train"]
    assert train and train[-1]["peak_mem_gib"] > 0
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")):
        assert 0 < train[-1]["mfu"] <= train[-1]["hfu"] < 1  # executed FLOPs include the recomputation


def test_the_dry_run_estimate_is_within_10_percent_of_the_measured_peak():
    config = tiny_config(vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=128, total_ut_steps=4,
                         max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    shape = StepShape(seq_len=8192, checkpointing="layer", bf16=True)
    estimate = step_memory(config, shape, DeepSpeedConfig(zero_stage=2), world_size=1)["peak"]
    torch.manual_seed(0)
    model = OuroForCausalLM(config).to(torch.bfloat16)
    model.set_activation_checkpointing("layer")
    engine, _ = deepspeed_engine(model, 2)
    ids = torch.randint(0, config.vocab_size, (1, shape.seq_len), device=CUDA)
    labels = ids.clone()
    labels[:, 0] = -100  # the step the estimator traces (`run_step`), under the DeepSpeed engine
    for _ in range(2):  # the second step holds the optimizer states from the first
        torch.cuda.reset_peak_memory_stats()
        engine.backward(objective_loss(engine, ids, None, labels))
        engine.step()
    measured = torch.cuda.max_memory_allocated()
    assert abs(estimate / measured - 1) <= 0.10, (estimate / 2**30, measured / 2**30)
