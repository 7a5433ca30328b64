"""Which AdamW the DeepSpeed config asks for: on a GPU, torch's fused AdamW (a kernel shipped with torch),
never DeepSpeed's FusedAdam, which is compiled at start-up and dies on an image without nvcc."""

import deepspeed
import torch

from ouro_train.config import DeepSpeedConfig, OptimConfig
from ouro_train.train.engine import build_ds_config, init_distributed, param_groups


def ds_config(monkeypatch, on_gpu: bool, **deepspeed_settings) -> dict:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    return build_ds_config(DeepSpeedConfig(**deepspeed_settings), OptimConfig(lr=1e-3), micro_batch=1, grad_accum=1,
                           world_size=1)


def test_on_a_gpu_the_config_asks_for_torch_fused_adamw(monkeypatch):
    params = ds_config(monkeypatch, True)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cpu = ds_config(monkeypatch, False)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu  # fused kernels are the GPU's
    offload = ds_config(monkeypatch, True, offload_optimizer=True)["optimizer"]["params"]
    assert "torch_adam" not in offload  # states on the CPU: DeepSpeed's CPU Adam


def test_deepspeed_builds_torch_adamw_from_the_gpu_config_without_building_an_op(monkeypatch):
    """The GPU config run through DeepSpeed (on the CPU, where torch's fused AdamW also exists): the
    engine's optimizer is torch's fused AdamW and no op builder is asked to load (compile) anything."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    config = ds_config(monkeypatch, True, bf16=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    init_distributed()
    builds = []
    monkeypatch.setattr(OpBuilder, "load", lambda self, *a, **k: builds.append(self.name))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config)
    basic = getattr(optimizer, "optimizer", optimizer)
    try:
        assert type(basic) is torch.optim.AdamW and basic.defaults["fused"] is True
        loss = engine(torch.ones(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert builds == []
    finally:
        engine.destroy()
