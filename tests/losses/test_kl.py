import numpy as np
import pytest
import torch

from detdistill.losses import KLLogitLoss, kl_logit_loss
from detdistill.distill.methods import METHODS


def _logits(seed=0, shape=(2, 7, 5), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64) * scale,
        torch.randn(shape, generator=g, dtype=torch.float64) * scale,
    )


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(s, t, T, mode):
    s, t = s.numpy() / T, t.numpy() / T
    if mode == "softmax":
        p, q = _np_softmax(t), _np_softmax(s)
        per = (p * np.log(p / q)).sum(-1)
    else:
        p, q = 1 / (1 + np.exp(-t)), 1 / (1 + np.exp(-s))
        per = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(-1)
    return per * T * T


def test_registry():
    assert METHODS.get("kl").params_signature() is KLLogitLoss.__init__


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_zero_for_equal_logits(mode):
    s, _ = _logits()
    assert abs(kl_logit_loss(s, s.clone(), mode=mode).item()) < 1e-6
    assert abs(kl_logit_loss(s, s.clone(), mode=mode, temperature=4.0).item()) < 1e-6


def test_hand_computed_small_case():
    # one anchor, two classes, T = 1
    s = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    t = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    bkl = lambda p, q: p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))  # noqa: E731
    expected_sig = bkl(sig(1.0), sig(0.0)) + bkl(sig(-1.0), sig(1.0))
    p = np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
    q = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    expected_soft = float((p * np.log(p / q)).sum())
    assert abs(kl_logit_loss(s, t, mode="sigmoid").item() - expected_sig) < 1e-12
    assert abs(kl_logit_loss(s, t, mode="softmax").item() - expected_soft) < 1e-12


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_matches_numpy(mode, T):
    s, t = _logits(1)
    expected = _np_kl(s, t, T, mode).mean()
    assert abs(kl_logit_loss(s, t, temperature=T, mode=mode).item() - expected) < 1e-10
    assert abs(KLLogitLoss(temperature=T, mode=mode)(s, t).item() - expected) < 1e-10


def test_temperature_scaling():
    s, t = _logits(2, scale=1.0)
    # T^2 factor: loss(T) = T^2 * KL of the softened distributions
    for mode in ("sigmoid", "softmax"):
        raw = _np_kl(s, t, 3.0, mode).mean() / 9.0
        assert abs(kl_logit_loss(s, t, temperature=3.0, mode=mode).item() - 9.0 * raw) < 1e-10
    # softening: the raw KL (without T^2) shrinks as T grows
    raws = [kl_logit_loss(s, t, temperature=T, mode="softmax").item() / T**2 for T in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(raws, raws[1:]))
    # large T: T^2 * KL tends to logit matching (Hinton et al. 2015)
    d = (t - s).numpy()
    soft_lim = (((d - d.mean(-1, keepdims=True)) ** 2).sum(-1) / (2 * d.shape[-1])).mean()
    sig_lim = ((d**2).sum(-1) / 8).mean()
    big = 1000.0
    assert abs(kl_logit_loss(s, t, temperature=big, mode="softmax").item() - soft_lim) < 1e-3 * soft_lim
    assert abs(kl_logit_loss(s, t, temperature=big, mode="sigmoid").item() - sig_lim) < 1e-3 * sig_lim


def test_mask_weights_anchors():
    s, t = _logits(3)
    per = _np_kl(s, t, 1.0, "sigmoid")  # (N, A)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = mask[1, 6] = True
    expected = per[mask.numpy()].mean()
    assert abs(kl_logit_loss(s, t, mask=mask).item() - expected) < 1e-10
    w = torch.rand(2, 7, dtype=torch.float64)
    expected_w = (per * w.numpy()).sum() / w.numpy().sum()
    assert abs(KLLogitLoss()(s, t, mask=w).item() - expected_w) < 1e-10
    s.requires_grad_(True)
    empty = kl_logit_loss(s, t, mask=torch.zeros(2, 7, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_grad_to_student_not_teacher(mode):
    s, t = _logits(4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kl_logit_loss(s, t, mode=mode, temperature=2.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_stable_for_large_logits():
    s = torch.tensor([[[80.0, -90.0, 0.0]]], requires_grad=True)
    t = torch.tensor([[[-85.0, 95.0, 3.0]]])
    for mode in ("sigmoid", "softmax"):
        loss = kl_logit_loss(s, t, mode=mode)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_validation():
    s = torch.randn(2, 7, 5)
    with pytest.raises(ValueError, match=r"\(2, 7, 5\).*\(2, 7, 4\)"):
        kl_logit_loss(s, torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="temperature"):
        kl_logit_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="mode"):
        KLLogitLoss(mode="tanh")
    with pytest.raises(ValueError, match="mask shape"):
        kl_logit_loss(s, s, mask=torch.ones(2, 5, dtype=torch.bool))
