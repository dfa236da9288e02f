"""Box distillation losses: invariants and a check against a per-anchor loop."""

from __future__ import annotations

import math

import pytest
import torch

from detdistill.losses.box_distill import weighted_box_distill_loss, weighted_distribution_distill_loss


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_boxes_and_distributions_cost_nothing() -> None:
    b, w = _rand(2, 7, 4), _rand(2, 7, seed=1).sigmoid()
    assert weighted_box_distill_loss(b, b, w).item() == 0.0
    d = _rand(2, 7, 4 * 16, seed=2)
    assert weighted_distribution_distill_loss(d, d, w).abs().item() < 1e-12


def test_distribution_loss_matches_a_per_anchor_loop() -> None:
    n, a, bins, t = 2, 5, 8, 2.0
    s, tt, w = _rand(n, a, 4 * bins), _rand(n, a, 4 * bins, seed=1), _rand(n, a, seed=2).sigmoid()
    num = den = 0.0
    for i in range(n):
        for j in range(a):
            kls = []
            for side in range(4):
                p = torch.softmax(tt[i, j, side * bins:(side + 1) * bins] / t, 0)
                q = torch.softmax(s[i, j, side * bins:(side + 1) * bins] / t, 0)
                kls.append(float((p * (p.log() - q.log())).sum()) * t * t)
            num += float(w[i, j]) * sum(kls) / 4
            den += float(w[i, j])
    got = weighted_distribution_distill_loss(s, tt, w, temperature=t)
    assert math.isclose(got.item(), num / den, rel_tol=1e-10)


def test_box_loss_matches_a_per_anchor_loop() -> None:
    s, t, w = _rand(2, 6, 4) * 3, _rand(2, 6, 4, seed=1) * 3, _rand(2, 6, seed=2).sigmoid()
    diff = (s - t).abs()
    per = torch.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean(-1)
    expected = (per * w).sum() / w.sum()
    assert torch.allclose(weighted_box_distill_loss(s, t, w), expected, rtol=1e-5)


def test_zero_weight_anchors_do_not_count_and_all_zero_is_zero() -> None:
    s, t = _rand(1, 4, 32), _rand(1, 4, 32, seed=1)
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    changed = t.clone()
    changed[0, 1:] += 5.0  # anchors with no weight
    assert torch.allclose(weighted_distribution_distill_loss(s, t, w), weighted_distribution_distill_loss(s, changed, w))
    zero = weighted_distribution_distill_loss(s.requires_grad_(), t, torch.zeros(1, 4, dtype=torch.float64))
    assert zero.item() == 0.0
    zero.backward()  # still differentiable


def test_gradient_reaches_the_student_only() -> None:
    s, t = _rand(1, 3, 16).requires_grad_(), _rand(1, 3, 16, seed=1).requires_grad_()
    weighted_distribution_distill_loss(s, t, torch.ones(1, 3, dtype=torch.float64)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="do not split into 4 sides"):
        weighted_distribution_distill_loss(_rand(1, 2, 10), _rand(1, 2, 10), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"weights \(1, 3\) must be \(1, 2\)"):
        weighted_distribution_distill_loss(_rand(1, 2, 8), _rand(1, 2, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_distribution_distill_loss(_rand(1, 2, 8), _rand(1, 3, 8), torch.ones(1, 2))
