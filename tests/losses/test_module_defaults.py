"""Every loss *module* agrees with its documented pure function.

The Distiller builds each loss from the module's constructor defaults (a config term with
no ``params``), while the documentation, the tests of the equations and the papers' values
live on the pure functions. A default that drifts in one place only would silently change
real training, so for each (module, function) pair:

- every constructor argument that the function also takes has the same default;
- the module with its defaults gives the same value as the function with its defaults, on
  random, *different* inputs (identical inputs give 0 whatever the constants are);
- the paper constants are pinned where METHODS.md states them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
from torch import nn

from detdistill.losses.feature import L1FeatureLoss, L2FeatureLoss, l1_feature_loss, l2_feature_loss
from detdistill.losses.gaussian_mask import gaussian_masks
from detdistill.losses.kl import KLLogitLoss, kl_logit_loss
from detdistill.losses.mssd import MSSDLoss, mssd_mask_loss, mssd_self_distill_loss
from detdistill.losses.pkd import PKDLoss, pkd_loss
from detdistill.losses.ssim import SSIMLoss, ssim_loss


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _maps(seed: int, shape: tuple[int, ...] = (2, 4, 12, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = 0.6 * s + torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 1.5  # correlated, not equal
    return s, t


PAIRS: list[tuple[type[nn.Module], Callable[..., Any]]] = [
    (L2FeatureLoss, l2_feature_loss),
    (L1FeatureLoss, l1_feature_loss),
    (PKDLoss, pkd_loss),
    (SSIMLoss, ssim_loss),
    (KLLogitLoss, kl_logit_loss),
    (MSSDLoss, gaussian_masks),
    (MSSDLoss, mssd_self_distill_loss),
]


@pytest.mark.parametrize("module, function", PAIRS, ids=lambda x: x.__name__)
def test_module_defaults_equal_function_defaults(module: type[nn.Module], function: Callable[..., Any]) -> None:
    mod, fn = _defaults(module.__init__), _defaults(function)
    shared = sorted(set(mod) & set(fn))
    if module is not MSSDLoss:  # MSSD splits its arguments over two functions
        assert set(mod) <= set(fn), f"{module.__name__} has arguments its function lacks: {set(mod) - set(fn)}"
    assert shared or module is MSSDLoss
    for name in shared:
        a, b = mod[name], fn[name]
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            a, b = tuple(a), tuple(b)
        assert a == b, f"{module.__name__}({name}={mod[name]!r}) but {function.__name__}({name}={fn[name]!r})"


@pytest.mark.parametrize("module, function, make", [
    (L2FeatureLoss, l2_feature_loss, lambda: _maps(0)),
    (L1FeatureLoss, l1_feature_loss, lambda: _maps(1)),
    (PKDLoss, pkd_loss, lambda: _maps(2)),
    (SSIMLoss, ssim_loss, lambda: _maps(3, (2, 3, 16, 14))),
    (KLLogitLoss, kl_logit_loss, lambda: _maps(4, (2, 50, 5))),
], ids=lambda x: getattr(x, "__name__", ""))
def test_module_equals_function_on_random_inputs(module: type[nn.Module], function: Callable[..., Any],
                                                make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
    s, t = make()
    got, want = module()(s, t), function(s, t)
    assert float(want) > 1e-3  # different inputs: a constant that matters changes this value
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mssd_module_equals_its_functions() -> None:
    """MSSDLoss(defaults) = sum_l w_l * self(F_l, P_l, M_l) and lambda * sum_l mask(sigmoid(A_l P_l), M_l),
    with the masks from gaussian_masks(defaults)."""
    torch.manual_seed(0)
    loss = MSSDLoss(channels=4)
    boxes = [torch.tensor([[4.0, 6.0, 20.0, 30.0], [40.0, 8.0, 110.0, 60.0]]), torch.tensor([[10.0, 10.0, 120.0, 120.0]])]
    fpn = [torch.randn(2, 4, 128 // s, 128 // s) for s in (8, 16, 32)]
    pan = [torch.randn(2, 4, 128 // s, 128 // s) for s in (8, 16, 32)]
    out = loss(fpn, pan, boxes, (128, 128))
    masks = gaussian_masks(boxes, (128, 128))
    want_self = sum(mssd_self_distill_loss(f, p, m) for f, p, m in zip(fpn, pan, masks))
    want_mask = sum(mssd_mask_loss(torch.sigmoid(a(p)), m) for a, p, m in zip(loss.adapters, pan, masks))
    assert all(float(m.sum()) > 0 for m in masks)  # every scale has an object: no trivially-zero term
    torch.testing.assert_close(out["mssd_self"], want_self)
    torch.testing.assert_close(out["mssd_mask"], want_mask)


def test_paper_constants_are_the_defaults() -> None:
    """METHODS.md: SSIM uses an 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03 and
    alpha = beta = gamma = 1; PKD's eps is small; MSSD splits sizes at COCO's 32 and 96 px."""
    ssim = _defaults(ssim_loss)
    assert (ssim["window_size"], ssim["sigma"], ssim["k1"], ssim["k2"]) == (11, 1.5, 0.01, 0.03)
    assert (ssim["alpha"], ssim["beta"], ssim["gamma"]) == (1, 1, 1)
    assert _defaults(pkd_loss)["eps"] <= 1e-5
    assert tuple(_defaults(gaussian_masks)["size_thresholds"]) == (32.0, 96.0)
    assert _defaults(kl_logit_loss)["temperature"] == 1.0
