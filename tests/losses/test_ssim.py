import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from detdistill.losses import (
    SSIMLoss,
    minmax_normalize,
    ssim_components,
    ssim_loss,
    ssim_map,
)
from detdistill.distill.methods import METHODS

C1, C2 = 0.01**2, 0.03**2


def _maps(seed=0, shape=(32, 40)):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    y = np.clip(0.6 * x + 0.4 * rng.random(shape), 0, 1)
    return x, y


def _indep(seed=0, shape=(32, 40)):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)[None, None]


def _brute_force(x, y, wh, ww, sigma=1.5):
    """Independent numpy SSIM over 'valid' windows of size wh x ww (two-term formula)."""
    def g(n):
        k = np.arange(n) - (n - 1) / 2
        w = np.exp(-(k**2) / (2 * sigma**2))
        return w / w.sum()

    w = np.outer(g(wh), g(ww))
    h, wd = x.shape
    out = np.empty((h - wh + 1, wd - ww + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            px, py = x[i : i + wh, j : j + ww], y[i : i + wh, j : j + ww]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            out[i, j] = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return out


def test_registry():
    assert METHODS.get("ssim").loss is SSIMLoss


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_skimage(seed):
    x, y = _maps(seed)
    kw = dict(data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ref_mean, ref_full = structural_similarity(x, y, full=True, **kw)
    ours = ssim_map(_t(x), _t(y))[0, 0].numpy()
    # skimage filters with reflect padding, then crops (win_size - 1) // 2 = 5 pixels from
    # every side before the mean: exactly our 'valid' region.
    pad = (11 - 1) // 2
    assert ours.shape == (32 - 2 * pad, 40 - 2 * pad)
    assert abs(ours.mean() - ref_mean) < 1e-5
    np.testing.assert_allclose(ours, ref_full[pad:-pad, pad:-pad], atol=1e-10)


def test_matches_brute_force():
    x, y = _maps(2, (14, 16))
    np.testing.assert_allclose(ssim_map(_t(x), _t(y))[0, 0].numpy(), _brute_force(x, y, 11, 11), atol=1e-12)


def test_general_form_all_ones_equals_two_term():
    x, y = _indep(3)
    tx, ty = _t(x), _t(y)
    lum, con, struct = ssim_components(tx, ty)
    two_term = ssim_map(tx, ty, alpha=1, beta=1, gamma=1)
    torch.testing.assert_close(lum * con * struct, two_term, atol=1e-12, rtol=0)
    assert (struct < 0).any()  # the structure term does go negative on random maps
    # beta != gamma takes the three-factor path; beta = 1 + tiny must be ~ the same
    near = ssim_map(tx, ty, alpha=1, beta=1 + 1e-9, gamma=1)
    torch.testing.assert_close(near, two_term, atol=1e-7, rtol=0)


def test_exponents():
    x, y = _indep(4)
    tx, ty = _t(x), _t(y)
    lum, con, struct = ssim_components(tx, ty)
    only_s = ssim_map(tx, ty, alpha=0, beta=0, gamma=1)
    torch.testing.assert_close(only_s, struct, atol=1e-12, rtol=0)
    sq = ssim_map(tx, ty, alpha=2, beta=1, gamma=3)
    torch.testing.assert_close(sq, lum**2 * con * struct**3, atol=1e-12, rtol=0)
    # non-integer exponent with negative structure: clamp -> 0, signed -> sign(s)|s|^g
    clamp = ssim_map(tx, ty, alpha=0, beta=0, gamma=0.5)
    signed = ssim_map(tx, ty, alpha=0, beta=0, gamma=0.5, negative_base="signed")
    neg = struct < 0
    assert neg.any()
    assert torch.isfinite(clamp).all() and torch.isfinite(signed).all()
    assert (clamp[neg] < 1e-3).all()
    torch.testing.assert_close(signed, torch.sign(struct) * struct.abs() ** 0.5, atol=1e-10, rtol=0)


@pytest.mark.parametrize("negative_base", ["clamp", "signed"])
def test_fractional_exponent_grads_finite(negative_base):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 16, 16, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 16, 16, generator=g)
    loss = ssim_loss(s, t, alpha=0.5, beta=0.7, gamma=1.5, negative_base=negative_base)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_zero_for_identical():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4, 20, 24, generator=g)
    assert ssim_loss(s, s.clone()).item() < 1e-6
    assert SSIMLoss(alpha=0.5, beta=2, gamma=0.3)(s, s.clone()).item() < 1e-6


def test_batched_mean_equals_mean_of_singles():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 2, 16, 18, generator=g, dtype=torch.float64)
    t = torch.randn(3, 2, 16, 18, generator=g, dtype=torch.float64)
    singles = torch.stack([ssim_loss(s[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(ssim_loss(s, t), singles.mean(), atol=1e-12, rtol=0)


def test_loss_is_mean_of_half_one_minus_ssim_on_normalised_maps():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64) * 4 + 2
    t = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    ns = (s - s.amin((2, 3), True)) / (s.amax((2, 3), True) - s.amin((2, 3), True))
    nt = (t - t.amin((2, 3), True)) / (t.amax((2, 3), True) - t.amin((2, 3), True))
    expected = ((1 - ssim_map(ns, nt)) / 2).mean()
    torch.testing.assert_close(ssim_loss(s, t), expected, atol=1e-12, rtol=0)
    # per-channel min-max makes the loss invariant to per-channel positive affine changes
    a = torch.tensor([0.1, 2.0, 30.0], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(ssim_loss(s * a - 5, t), ssim_loss(s, t), atol=1e-10, rtol=0)
    assert abs(ssim_loss(s * a - 5, t, normalize="tensor").item() - ssim_loss(s, t, normalize="tensor").item()) > 1e-4


def test_minmax_modes():
    x = torch.randn(2, 3, 5, 5)
    for mode, dims in (("channel", (2, 3)), ("sample", (1, 2, 3)), ("tensor", (0, 1, 2, 3))):
        y = minmax_normalize(x, mode)
        assert torch.allclose(y.amin(dims), torch.zeros(())) and torch.allclose(y.amax(dims), torch.ones(()))
    assert minmax_normalize(x, "none") is x
    with pytest.raises(ValueError, match="normalize"):
        minmax_normalize(x, "pixel")


def test_grad_to_student_not_teacher():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 3, 16, 16, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 16, 16, generator=g, requires_grad=True)
    ssim_loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_window_shrinks_for_small_maps():
    x, y = _maps(10, (7, 20))
    out = ssim_map(_t(x), _t(y))
    assert out.shape == (1, 1, 1, 10)  # 7x11 window: height shrunk to 7, width kept
    np.testing.assert_allclose(out[0, 0].numpy(), _brute_force(x, y, 7, 11), atol=1e-12)
    x, y = _maps(11, (4, 6))  # even extents: largest odd size below -> 3x5
    out = ssim_map(_t(x), _t(y))
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0].numpy(), _brute_force(x, y, 3, 5), atol=1e-12)
    s = torch.randn(2, 3, 1, 3, requires_grad=True)
    loss = ssim_loss(s, torch.randn(2, 3, 1, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_validation():
    with pytest.raises(ValueError, match="1x1 connector"):
        ssim_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\).*\(1, 3, 8, 8\)"):
        ssim_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="window_size"):
        ssim_map(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), window_size=10)
    with pytest.raises(ValueError, match="gamma"):
        SSIMLoss(gamma=-1)
