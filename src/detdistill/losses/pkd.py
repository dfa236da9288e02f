"""PKD: feature imitation with the Pearson correlation coefficient (Cao et al., 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detdistill.losses.feature import _check_feature_pair, _high_precision, _no_autocast

__all__ = ["pkd_loss", "PKDLoss", "channel_standardize"]


def channel_standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Standardise each channel of ``x`` (N, C, H, W) over batch and space.

    .. math:: \hat x_{nchw} = \frac{x_{nchw} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon^2}},
       \quad \mu_c, \sigma_c^2 \text{ over the } N \cdot H \cdot W \text{ values of channel } c

    ``σ²`` is the population (biased, divide-by-``NHW``) variance. ``eps`` is a floor on the
    standard deviation: it enters as ``sqrt(var + eps**2)``, which is ``≈ std`` for
    ``std >> eps`` and, unlike ``std + eps``, stays differentiable for a constant channel
    (which maps to all zeros).
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps * eps)


def pkd_loss(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    r"""PKD feature loss for one FPN level: ``1 - Pearson r``, averaged over channels.

    Both maps are standardised per channel (:func:`channel_standardize`: mean 0, variance 1
    over the ``N·H·W`` values of each channel, population variance), then

    .. math:: L_{PKD} = \frac{1}{2} \cdot \frac{1}{NCHW} \sum_{n,c,h,w}
              (\hat F^S_{nchw} - \hat F^T_{nchw})^2 = 1 - \frac{1}{C}\sum_c r_c

    where ``r_c`` is the Pearson correlation between the student's and the teacher's
    ``N·H·W`` values of channel ``c`` (the identity is exact up to ``eps``). The loss is
    invariant to any per-channel positive affine change of either map (``a_c x + b_c``,
    ``a_c > 0``), lies in ``[0, 2]``, and is 0 for identical maps. A constant channel
    (zero variance, r undefined) standardises to zeros; its term is then ``1/2`` (half the
    MSE against a unit-variance map) rather than ``1 - r_c``, with finite gradients.

    Reference: W. Cao, Y. Zhang, J. Gao, A. Cheng, K. Cheng, J. Cheng, "PKD: General
    Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
    NeurIPS 2022, arXiv:2207.02039.

    Readings of open details:
        * Statistics are pooled over the batch (as in the paper), so the loss of a batch is
          NOT the mean of per-sample losses; it equals the loss of the samples laid side by
          side in one map.
        * Population variance (the reference code's unbiased ``std`` only rescales the loss
          by ``(M-1)/M``, ``M = N·H·W``).
        * If the spatial sizes differ, the student map is resized to the teacher's size with
          bilinear interpolation (``align_corners=False``) before the loss; the caller or
          connector may already have done this, in which case nothing happens.
        * Half/bfloat16 inputs are computed in float32 with autocast disabled.

    Args:
        student: student FPN map ``(N, C, Hs, Ws)``, already mapped to the teacher's ``C``
            channels (a 1x1 connector is needed when the channel counts differ).
        teacher: teacher FPN map ``(N, C, Ht, Wt)``; detached inside (never trained).
        eps: floor on each channel's standard deviation (see :func:`channel_standardize`).

    Returns:
        A scalar tensor.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s, t = _check_feature_pair(student, teacher, four_d=True, allow_spatial_mismatch=True)
    with _no_autocast(s):
        s = _high_precision(s)
        t = _high_precision(t).to(s.dtype)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(channel_standardize(s, eps), channel_standardize(t, eps)) / 2


class PKDLoss(nn.Module):
    """Module form of :func:`pkd_loss` (registry name ``'pkd'``)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pkd_loss(student, teacher, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
