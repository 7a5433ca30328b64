"""`optim.schedule`: each schedule's learning rates, update by update, against its formula written out
here, as a torch optimizer stepped the way DeepSpeed steps it sees them; the config's refusals; and the
rates a real run logs."""

import math

import pytest
import torch

from train_helpers import compose_run, metrics
from ouro_train.config import ConfigError, OptimConfig, Schedule
from ouro_train.train.engine import scheduler_factory
from ouro_train.train.trainer import Trainer

LR, N = 0.5, 20


def applied_rates(optim: OptimConfig, total: int) -> list[float]:
    """The lr each of `total` updates runs at: read before optimizer.step(), then the schedule steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=optim.lr)
    scheduler = scheduler_factory(optim, total)(optimizer)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def expected(kind: str, s: int, warmup: int, floor: float, decay: int = 0) -> float:
    if s < warmup:
        return LR * (s + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return LR
    if kind == "wsd":
        start = N - decay  # the stable phase ends here
        return LR if s < start else LR * (floor + (1 - floor) * (N - s) / decay)
    p = (s - warmup) / (N - warmup)
    shape = (1 + math.cos(math.pi * p)) / 2 if kind == "cosine" else 1 - p
    return LR * (floor + (1 - floor) * shape)


@pytest.mark.parametrize("floor", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup", "wsd"])
def test_each_schedule_follows_its_formula(kind, floor):
    optim = OptimConfig(lr=LR, warmup_steps=4, min_lr_ratio=floor, schedule=Schedule(kind), decay_ratio=0.25)
    got = applied_rates(optim, N)
    want = [expected(kind, s, 4, floor, decay=5) for s in range(N)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if kind != "constant_with_warmup":  # the decaying ones end one step short of lr · min_lr_ratio
        assert got[-1] > LR * floor


def test_constant_is_lr_at_every_update():
    assert applied_rates(OptimConfig(lr=LR, schedule=Schedule.constant), N) == [LR] * N


def test_wsd_is_stable_until_its_decay_and_linear_to_the_floor():
    optim = OptimConfig(lr=LR, warmup_ratio=0.1, min_lr_ratio=0.0, schedule=Schedule.wsd, decay_ratio=0.2)
    got = applied_rates(optim, N)  # warm-up 2, stable 2..15, decay 16..19
    assert got[:2] == [LR / 2, LR]
    assert got[2:16] == [LR] * 14
    assert got[16:] == pytest.approx([LR, 0.75 * LR, 0.5 * LR, 0.25 * LR])


def test_cosine_without_warmup_starts_at_lr_and_is_halfway_at_mid_run():
    got = applied_rates(OptimConfig(lr=LR, min_lr_ratio=0.0), N)
    assert got[0] == LR and got[N // 2] == pytest.approx(LR / 2)


def test_constant_refuses_a_warmup_and_decay_ratio_is_checked():
    with pytest.raises(ConfigError, match="optim.schedule: constant has no warm-up"):
        OptimConfig(schedule=Schedule.constant, warmup_steps=3).check("optim")
    with pytest.raises(ConfigError, match="optim.decay_ratio"):
        OptimConfig(schedule=Schedule.wsd, decay_ratio=0.0).check("optim")
    with pytest.raises(Exception, match="schedule"):
        compose_run("optim.schedule=cosine_to_zero")


def test_a_run_logs_the_linear_schedule(tmp_path, data_cache):
    cfg = compose_run(f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", "wandb.mode=disabled",
                      "export_at_end=false", "max_steps=4", "optim.schedule=linear", "optim.warmup_steps=1",
                      "optim.min_lr_ratio=0.2", "optim.lr=1e-3")
    Trainer(cfg).train()
    logged = [metrics(tmp_path)[s]["lr"] for s in (1, 2, 3, 4)]
    # warm-up 1, then linear over 3 updates from 1e-3 towards 2e-4
    assert logged == pytest.approx([1e-3, 1e-3, 1e-3 * (0.2 + 0.8 * 2 / 3), 1e-3 * (0.2 + 0.8 / 3)], rel=1e-9)
