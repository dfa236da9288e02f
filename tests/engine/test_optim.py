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


def _two_kinds(lr_other: float = 0.02) -> tuple[nn.Linear, nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    student, assistant = nn.Linear(3, 2), nn.Linear(3, 2)
    cfg = TrainConfig(steps=20, warmup_steps=4, lr=lr_other, momentum=0.9, weight_decay=1e-4)
    opt = build_optimizer(cfg, list(student.parameters()) + list(assistant.parameters()),
                          [(list(assistant.parameters()), {"optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4})])
    return student, assistant, opt


def _quadratic_step(opt: torch.optim.Optimizer, modules: list[nn.Module]) -> None:
    opt.zero_grad()
    sum(((m.weight - 1.0) ** 2).sum() + (m.bias ** 2).sum() for m in modules).backward()
    opt.step()


def test_an_override_of_another_kind_trains_with_that_optimizer() -> None:
    """A group marked ``optimizer: adam`` under an SGD run is stepped by Adam: the weights equal
    those of separately built torch SGD and Adam optimizers on copies of the same modules,
    with the same schedule applied to both."""
    from detdistill.engine.optim import OptimizerChain

    student, assistant, opt = _two_kinds()
    assert isinstance(opt, OptimizerChain)
    assert [type(o) for o in opt.optimizers] == [torch.optim.SGD, torch.optim.Adam]
    sched = build_scheduler(TrainConfig(steps=20, warmup_steps=4, lr=0.02), opt)
    ref_s, ref_a = nn.Linear(3, 2), nn.Linear(3, 2)
    ref_s.load_state_dict(student.state_dict())
    ref_a.load_state_dict(assistant.state_dict())
    sgd = torch.optim.SGD([{"params": [ref_s.weight], "weight_decay": 1e-4}, {"params": [ref_s.bias], "weight_decay": 0.0}],
                          lr=0.02, momentum=0.9)
    adam = torch.optim.Adam(ref_a.parameters(), lr=3e-3, weight_decay=1e-4)
    refs = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: lr_factor(k, TrainConfig(steps=20, warmup_steps=4)))
            for o in (sgd, adam)]
    for _ in range(8):
        _quadratic_step(opt, [student, assistant])
        sched.step()
        for o, r in zip((sgd, adam), refs):
            _quadratic_step(o, [ref_s] if o is sgd else [ref_a])
            r.step()
    for mine, ref in ((student, ref_s), (assistant, ref_a)):
        for p, q in zip(mine.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert opt.param_groups[-1]["lr"] == pytest.approx(3e-3 * lr_factor(8, TrainConfig(steps=20, warmup_steps=4)))


def test_optimizer_chain_resumes_exactly() -> None:
    """Saved after 3 steps and loaded into a freshly built chain, 3 more steps give the same
    weights as 6 uninterrupted ones (both optimizers' moments come back, and the scheduler
    still reaches the reloaded groups)."""
    cfg = TrainConfig(steps=20, warmup_steps=4, lr=0.02)
    s1, a1, o1 = _two_kinds()
    sch1 = build_scheduler(cfg, o1)
    for _ in range(6):
        _quadratic_step(o1, [s1, a1])
        sch1.step()
    s2, a2, o2 = _two_kinds()
    sch2 = build_scheduler(cfg, o2)
    for _ in range(3):
        _quadratic_step(o2, [s2, a2])
        sch2.step()
    saved_opt, saved_sched = o2.state_dict(), sch2.state_dict()
    saved_w = [p.detach().clone() for p in (*s2.parameters(), *a2.parameters())]
    s3, a3, o3 = _two_kinds()
    sch3 = build_scheduler(cfg, o3)
    with torch.no_grad():
        for p, w in zip((*s3.parameters(), *a3.parameters()), saved_w):
            p.copy_(w)
    o3.load_state_dict(saved_opt)
    sch3.load_state_dict(saved_sched)
    for _ in range(3):
        _quadratic_step(o3, [s3, a3])
        sch3.step()
    for p, q in zip((*s1.parameters(), *a1.parameters()), (*s3.parameters(), *a3.parameters())):
        assert torch.equal(p, q)
    assert [g["lr"] for g in o3.param_groups] == [g["lr"] for g in o1.param_groups]


def test_optimizer_chain_refuses_a_single_optimizer_checkpoint_and_unknown_kinds() -> None:
    _, _, chain = _two_kinds()
    single = build_optimizer(TrainConfig(), [nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"holds one optimizer, this run trains with 2 \(SGD, Adam\)"):
        chain.load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match=r"optimizer 'lion'.*\['adam', 'adamw', 'sgd'\]"):
        build_optimizer(TrainConfig(), [nn.Parameter(torch.zeros(2))], [([nn.Parameter(torch.zeros(2))], {"optimizer": "lion"})])


def test_an_override_of_the_runs_own_kind_stays_one_optimizer() -> None:
    p, q = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    opt = build_optimizer(TrainConfig(optimizer="sgd"), [p, q], [([q], {"optimizer": "sgd", "lr": 0.5})])
    assert type(opt) is torch.optim.SGD and opt.param_groups[-1]["lr"] == 0.5
