"""Learning-rate schedules and gradient clipping, checked against hand-computed values.

The expected numbers are written out from the schedule's definition (linear warm-up from
0.001x, then cosine over the steps *after* warm-up, a step decay at fractions of
``train.steps``, or a constant), not recomputed with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detdistill.config import TrainConfig
from detdistill.engine.optim import build_optimizer, build_scheduler, lr_factor
from detdistill.engine.train import train_one_step

# 100 steps, 10 of warm-up: the cosine spans steps 10..100 (90 steps).
COSINE = {
    0: 0.001,
    5: 0.001 + 0.999 * 5 / 10,
    9: 0.001 + 0.999 * 9 / 10,
    10: 1.0,
    # (55 - 10) / 90 = 1/2 of the post-warm-up span: exactly half way down
    55: 0.5,
    # (40 - 10) / 90 = 1/3: 0.5 * (1 + cos(pi/3)) = 0.75
    40: 0.75,
    100: 0.0,
}
# milestones 0.5 and 0.8 of 100 steps, gamma 0.1
STEP = {0: 0.001, 10: 1.0, 49: 1.0, 50: 0.1, 79: 0.1, 80: 0.01, 99: 0.01}
CONSTANT = {0: 0.001, 5: 0.5005, 10: 1.0, 50: 1.0, 99: 1.0}


def _cfg(schedule: str) -> TrainConfig:
    return TrainConfig(steps=100, warmup_steps=10, schedule=schedule, milestones=[0.5, 0.8], gamma=0.1, lr=0.02)


@pytest.mark.parametrize("schedule, expected", [("cosine", COSINE), ("step", STEP), ("constant", CONSTANT)])
def test_lr_factor_at_chosen_steps(schedule: str, expected: dict[int, float]) -> None:
    cfg = _cfg(schedule)
    for step, factor in expected.items():
        assert lr_factor(step, cfg) == pytest.approx(factor, abs=1e-12), f"{schedule} at step {step}"


@pytest.mark.parametrize("schedule, expected", [("cosine", COSINE), ("step", STEP), ("constant", CONSTANT)])
def test_scheduler_drives_the_optimizer_lr(schedule: str, expected: dict[int, float]) -> None:
    """The LR the optimizer uses *during* step k (after k scheduler steps) is base * factor(k)."""
    cfg = _cfg(schedule)
    opt = build_optimizer(cfg, [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(cfg, opt)
    seen = {}
    for k in range(101):
        seen[k] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for step, factor in expected.items():
        for lr in seen[step]:  # both parameter groups (decay / no decay) follow the schedule
            assert lr == pytest.approx(cfg.lr * factor, abs=1e-12), f"{schedule} at step {step}"


def test_no_warmup_starts_at_full_lr() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(5, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


class _Quadratic(nn.Module):
    """Loss ``sum(scale * w**2)``: the gradient ``2 * scale * w`` is known in closed form."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 2.0, 12).reshape(3, 4))
        self.b = nn.Parameter(torch.tensor([0.5, -3.0]))
        self.scale = scale


class _QuadAdapter:
    def forward_train(self, model: _Quadratic, batch, *, need_raw: bool = False):
        return {"quad": model.scale * ((model.w ** 2).sum() + (model.b ** 2).sum())}, None


@pytest.mark.parametrize("clip", [0.1, 1.0])
def test_grad_clip_bounds_the_update(clip: float) -> None:
    """Plain SGD (lr 1, no momentum, no decay): the step moves the weights by exactly the
    clipped gradient, whose norm is ``clip`` when the raw gradient is larger."""
    model = _Quadratic(scale=5.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    raw = torch.cat([2 * 5.0 * model.w.detach().flatten(), 2 * 5.0 * model.b.detach().flatten()])
    assert float(raw.norm()) > 10 * clip  # clipping must act in this test
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    values = train_one_step(model, _QuadAdapter(), None, 0, optimizer=opt, scheduler=sched, grad_clip=clip)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    update = before - after
    assert values["grad_norm"] == pytest.approx(float(raw.norm()), rel=1e-6)  # the norm *before* clipping
    assert float(update.norm()) == pytest.approx(clip, rel=1e-5)
    # direction unchanged: clipping rescales, it does not rotate
    torch.testing.assert_close(update, raw * (clip / raw.norm()), rtol=1e-5, atol=1e-7)


def test_no_clip_applies_the_raw_gradient() -> None:
    model = _Quadratic(scale=5.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    values = train_one_step(model, _QuadAdapter(), None, 0, optimizer=opt, scheduler=sched, grad_clip=None)
    assert "grad_norm" not in values
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(before - after, 0.01 * 2 * 5.0 * before)
