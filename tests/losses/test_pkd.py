import numpy as np
import pytest
import torch

from detdistill.losses import PKDLoss, pkd_loss
from detdistill.distill.methods import METHODS


def _pair(seed=0, shape=(2, 5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    s = 0.5 * t + torch.randn(shape, generator=g, dtype=torch.float64)
    return s, t


def _numpy_one_minus_r(s, t):
    c = s.shape[1]
    s_ = s.detach().numpy().transpose(1, 0, 2, 3).reshape(c, -1)
    t_ = t.detach().numpy().transpose(1, 0, 2, 3).reshape(c, -1)
    r = [np.corrcoef(s_[k], t_[k])[0, 1] for k in range(c)]
    return 1.0 - float(np.mean(r))


def test_registry():
    assert METHODS.get("pkd").loss is PKDLoss


def test_equals_one_minus_mean_pearson():
    s, t = _pair()
    ref = _numpy_one_minus_r(s, t)
    assert 0.1 < ref < 1.9
    assert abs(pkd_loss(s, t).item() - ref) < 1e-8
    assert abs(PKDLoss()(s, t).item() - ref) < 1e-8


def test_invariant_to_positive_affine_per_channel():
    s, t = _pair(1)
    a = torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5], dtype=torch.float64).view(1, -1, 1, 1)
    b = torch.tensor([-4.0, 0.0, 2.0, 7.0, 100.0], dtype=torch.float64).view(1, -1, 1, 1)
    assert abs(pkd_loss(s * a + b, t).item() - pkd_loss(s, t).item()) < 1e-9
    # a negative scale flips the correlation sign: not invariant
    assert abs(pkd_loss(-s, t).item() - (2 - pkd_loss(s, t).item())) < 1e-9


def test_zero_for_identical():
    s, _ = _pair()
    assert pkd_loss(s, s.clone()).item() < 1e-6
    assert pkd_loss(s.float(), s.float().clone()).item() < 1e-6


def test_batch_statistics_are_pooled():
    # Statistics are over N*H*W per channel, so the batch loss equals the loss of the samples
    # laid side by side along H in one map, and (generally) not the mean of per-sample losses.
    s, t = _pair(2, shape=(3, 4, 5, 6))
    batched = pkd_loss(s, t)
    side_by_side = lambda x: x.permute(1, 0, 2, 3).reshape(1, 4, 15, 6)  # noqa: E731
    assert abs(batched.item() - pkd_loss(side_by_side(s), side_by_side(t)).item()) < 1e-12
    assert abs(batched.item() - _numpy_one_minus_r(s, t)) < 1e-8
    s2 = s.clone()
    s2[1] += 5.0  # shift one sample only: per-sample losses unchanged, pooled loss changes
    singles = lambda x: np.mean([pkd_loss(x[i : i + 1], t[i : i + 1]).item() for i in range(3)])  # noqa: E731
    assert abs(singles(s2) - singles(s)) < 1e-9
    assert abs(pkd_loss(s2, t).item() - batched.item()) > 1e-3


def test_grad_to_student_not_teacher():
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    pkd_loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_resize_path_student_smaller():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 4, 16, 20, generator=g)
    s = torch.randn(2, 4, 8, 10, generator=g, requires_grad=True)
    loss = pkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 2
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # an upsampled copy of the teacher's own low-res version scores well
    low = torch.nn.functional.interpolate(t, size=(8, 10), mode="bilinear", align_corners=False)
    up = torch.nn.functional.interpolate(low, size=(16, 20), mode="bilinear", align_corners=False)
    assert abs(pkd_loss(low, up).item()) < 1e-5


def test_constant_channel_is_finite():
    s = torch.zeros(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    loss = pkd_loss(s, t)
    loss.backward()
    assert abs(loss.item() - 0.5) < 1e-5  # constant channel -> zeros -> MSE/2 = 1/2
    assert torch.isfinite(s.grad).all()


def test_validation():
    with pytest.raises(ValueError, match="1x1 connector"):
        pkd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 3, 4, 4\)"):
        pkd_loss(torch.randn(3, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        pkd_loss(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4))
