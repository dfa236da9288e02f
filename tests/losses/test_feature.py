import numpy as np
import pytest
import torch

from detdistill.losses import L1FeatureLoss, L2FeatureLoss, l1_feature_loss, l2_feature_loss
from detdistill.distill.methods import METHODS


def _pair(seed=0, shape=(2, 4, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )


def test_registry_names():
    assert {"l2", "l1", "pkd", "ssim", "kl"} <= set(METHODS.names())
    assert METHODS.get("l2").loss is L2FeatureLoss
    assert METHODS.get("l1").loss is L1FeatureLoss


def test_l2_l1_match_numpy():
    s, t = _pair()
    ref2 = np.mean((s.numpy() - t.numpy()) ** 2)
    ref1 = np.mean(np.abs(s.numpy() - t.numpy()))
    assert abs(l2_feature_loss(s, t).item() - ref2) < 1e-12
    assert abs(l1_feature_loss(s, t).item() - ref1) < 1e-12
    assert abs(L2FeatureLoss()(s, t).item() - ref2) < 1e-12
    assert abs(l2_feature_loss(s, t, reduction="sum").item() - ref2 * s.numel()) < 1e-9
    assert l1_feature_loss(s, t, reduction="none").shape == s.shape


def test_zero_for_identical():
    s, _ = _pair()
    assert l2_feature_loss(s, s.clone()).item() < 1e-6
    assert l1_feature_loss(s, s.clone()).item() < 1e-6


def test_batched_mean_equals_mean_of_singles():
    s, t = _pair(shape=(3, 4, 6, 7))
    singles = torch.stack([l2_feature_loss(s[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert torch.allclose(l2_feature_loss(s, t), singles.mean(), atol=1e-12)


@pytest.mark.parametrize("fn", [l2_feature_loss, l1_feature_loss])
def test_grad_to_student_not_teacher(fn):
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_validation_messages():
    s = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"1x1 connector"):
        l2_feature_loss(s, torch.randn(2, 6, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(2, 4, 4, 4\)"):
        l2_feature_loss(s, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        L2FeatureLoss(reduction="avg")
    with pytest.raises(TypeError):
        l1_feature_loss(s, torch.ones(2, 4, 8, 8, dtype=torch.long))
