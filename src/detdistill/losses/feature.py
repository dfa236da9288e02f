"""Plain feature-imitation baselines (FitNet-style L2, and L1) plus the input checks shared by
the feature losses in this package.

Every feature loss takes ``(student, teacher)`` and detaches the teacher, so a distillation
loss never trains the teacher even when the teacher tensor requires grad.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


Reduction = Literal["mean", "sum", "none"]

__all__ = ["l2_feature_loss", "l1_feature_loss", "L2FeatureLoss", "L1FeatureLoss"]


# --------------------------------------------------------------------------- shared helpers
def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_feature_pair(
    student: object, teacher: object, *, four_d: bool, allow_spatial_mismatch: bool = False
) -> tuple[Tensor, Tensor]:
    """Validate a (student, teacher) feature pair and return them (teacher detached).

    Raises ``ValueError`` naming both shapes on a mismatch; a channel mismatch on 4-D maps
    says that a 1x1 connector (adapter) is needed.
    """
    s = _check_tensor(student, "student")
    t = _check_tensor(teacher, "teacher")
    if four_d and (s.dim() != 4 or t.dim() != 4):
        raise ValueError(
            "expected 4-D feature maps (N, C, H, W); got student shape "
            f"{tuple(s.shape)} and teacher shape {tuple(t.shape)}"
        )
    if s.dim() == 4 and t.dim() == 4:
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"batch sizes differ: student shape {tuple(s.shape)} vs teacher shape "
                f"{tuple(t.shape)}"
            )
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"channel counts differ: student shape {tuple(s.shape)} has {s.shape[1]} "
                f"channels, teacher shape {tuple(t.shape)} has {t.shape[1]}; a 1x1 connector "
                "(adapter conv) mapping the student to the teacher's channels is needed"
            )
        if s.shape[2:] != t.shape[2:] and not allow_spatial_mismatch:
            raise ValueError(
                f"spatial sizes differ: student shape {tuple(s.shape)} vs teacher shape "
                f"{tuple(t.shape)}; resize one of them (e.g. in the connector) first"
            )
    elif s.shape != t.shape:
        raise ValueError(
            f"shape mismatch: student shape {tuple(s.shape)} vs teacher shape {tuple(t.shape)}"
        )
    if s.numel() == 0:
        raise ValueError(f"empty feature maps: shape {tuple(s.shape)}")
    return s, t.detach()


def _high_precision(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32 (statistics over many values); keep float32/float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(x: Tensor) -> AbstractContextManager[object]:
    """Disable autocast for numerically sensitive statistics (variances, correlations)."""
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except (TypeError, RuntimeError):  # device type without autocast support
        enabled = False
    return torch.autocast(device_type=x.device.type, enabled=False) if enabled else nullcontext()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- losses
def l2_feature_loss(student: Tensor, teacher: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""FitNet-style L2 feature imitation: the mean squared error between feature maps.

    .. math:: L_{2} = \frac{1}{NCHW} \sum_{n,c,h,w} (F^S_{nchw} - F^T_{nchw})^2

    Reference: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio,
    "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550 (the "hint" loss; the
    paper uses half the sum of squares per example; we use the plain element mean, which is
    what detection KD baselines report as "L2" and only rescales the weight λ).

    Args:
        student: student features, usually ``(N, C, H, W)`` (any shape is accepted as long as
            it equals the teacher's); a channel mismatch needs a 1x1 connector first.
        teacher: teacher features of the same shape; detached inside (never trained).
        reduction: ``'mean'`` (default, over all elements), ``'sum'`` or ``'none'``
            (element-wise, the input shape).

    Returns:
        A scalar (``'mean'``/``'sum'``) or the element-wise loss (``'none'``).
    """
    _check_reduction(reduction)
    s, t = _check_feature_pair(student, teacher, four_d=False)
    return F.mse_loss(s, t.to(s.dtype), reduction=reduction)


def l1_feature_loss(student: Tensor, teacher: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""L1 feature imitation: the mean absolute error between feature maps.

    .. math:: L_{1} = \frac{1}{NCHW} \sum_{n,c,h,w} |F^S_{nchw} - F^T_{nchw}|

    The L1 baseline of P. de Rijk, L. Schneider, M. Cordts, D. M. Gavrila, "Structural
    Knowledge Distillation for Object Detection", NeurIPS 2022, arXiv:2211.13133 (Table 1
    compares SSIM against L1 and L2 feature imitation).

    Args:
        student: student features, usually ``(N, C, H, W)``; any shape equal to the teacher's.
        teacher: teacher features of the same shape; detached inside (never trained).
        reduction: ``'mean'`` (default), ``'sum'`` or ``'none'``.

    Returns:
        A scalar (``'mean'``/``'sum'``) or the element-wise loss (``'none'``).
    """
    _check_reduction(reduction)
    s, t = _check_feature_pair(student, teacher, four_d=False)
    return F.l1_loss(s, t.to(s.dtype), reduction=reduction)


class L2FeatureLoss(nn.Module):
    """Module form of :func:`l2_feature_loss` (registry name ``'l2'``)."""

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return l2_feature_loss(student, teacher, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class L1FeatureLoss(nn.Module):
    """Module form of :func:`l1_feature_loss` (registry name ``'l1'``)."""

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return l1_feature_loss(student, teacher, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
