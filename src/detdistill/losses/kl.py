"""Logit distillation for dense detection heads: KL divergence with a temperature."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detdistill.losses.feature import _check_tensor

KLMode = Literal["sigmoid", "softmax"]

__all__ = ["kl_logit_loss", "KLLogitLoss"]


def _check_kl_args(temperature: float, mode: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in ("sigmoid", "softmax"):
        raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")


def kl_logit_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mode: KLMode = "sigmoid",
    mask: Tensor | None = None,
) -> Tensor:
    r"""KL divergence between softened teacher and student class predictions, per anchor.

    With ``T`` the temperature, ``z^T, z^S`` the logits of one anchor over ``C`` classes:

    ``mode='softmax'`` (one distribution over the classes):

    .. math:: \ell_a = T^2 \sum_c p_c \log\frac{p_c}{q_c},\quad
              p = \mathrm{softmax}(z^T/T),\ q = \mathrm{softmax}(z^S/T)

    ``mode='sigmoid'`` (default; an independent binary distribution per class, matching the
    per-class sigmoid focal loss of torchvision's RetinaNet / FCOS heads):

    .. math:: \ell_a = T^2 \sum_c \Big[p_c \log\frac{p_c}{q_c}
              + (1-p_c)\log\frac{1-p_c}{1-q_c}\Big],\quad
              p = \sigma(z^T/T),\ q = \sigma(z^S/T)

    Loss = mean of ``ℓ_a`` over anchors, or with a ``mask`` the weighted mean
    ``Σ_a m_a ℓ_a / Σ_a m_a`` (0, still differentiable, when the mask is all zero).

    References: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural
    Network", 2015, arXiv:1503.02531 (temperature and the ``T²`` factor, which keeps the
    gradient scale independent of ``T``). The baseline "KL on class logits with a temperature"
    for dense heads listed by detdistill's method notes.

    Readings of open details:
        * Anchors/points of all FPN levels are concatenated along ``A``; classes are summed,
          anchors averaged (per-anchor KL, like ``F.kl_div(reduction='batchmean')`` per
          anchor).
        * The sigmoid form has no background class (focal-loss heads encode background as
          all-zero targets); use ``'softmax'`` for heads that have a softmax with background.
        * Computed in log space (``log_softmax`` / ``logsigmoid``), stable for large logits;
          half/bfloat16 logits are upcast to float32 (the loss is returned in float32).
        * For large ``T`` the loss tends to ``Σ_c (Δ_c - mean Δ)² / (2C)`` (softmax) and
          ``Σ_c Δ_c² / 8`` (sigmoid), ``Δ = z^T - z^S``: logit matching.

    Args:
        student_logits: ``(N, A, C)`` class logits (any ``(*, C)`` with ``>= 2`` dims is
            accepted; leading dims index anchors).
        teacher_logits: same shape; detached inside (never trained).
        temperature: ``T > 0``.
        mode: ``'sigmoid'`` or ``'softmax'``.
        mask: optional ``(N, A)`` (the leading dims) bool or float weights ``>= 0`` per anchor.

    Returns:
        A scalar tensor.
    """
    _check_kl_args(temperature, mode)
    s = _check_tensor(student_logits, "student_logits")
    t = _check_tensor(teacher_logits, "teacher_logits").detach()
    if s.shape != t.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
        )
    if s.dim() < 2:
        raise ValueError(f"expected logits shaped (N, A, C); got {tuple(s.shape)}")
    if s.shape[-1] == 0 or s.numel() == 0:
        raise ValueError(f"empty logits: shape {tuple(s.shape)}")
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    t = t.to(s.dtype)

    zs, zt = s / temperature, t / temperature
    if mode == "softmax":
        log_q = F.log_softmax(zs, dim=-1)
        log_p = F.log_softmax(zt, dim=-1)
        per_anchor = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:
        log_p, log_1mp = F.logsigmoid(zt), F.logsigmoid(-zt)
        log_q, log_1mq = F.logsigmoid(zs), F.logsigmoid(-zs)
        p = torch.sigmoid(zt)
        per_anchor = (p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)).sum(dim=-1)
    per_anchor = per_anchor * (temperature * temperature)

    if mask is None:
        loss = per_anchor.mean()
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != per_anchor.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
                f"{tuple(per_anchor.shape)} (logits shape {tuple(s.shape)})"
            )
        if not (mask.dtype == torch.bool or torch.is_floating_point(mask)):
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
        w = mask.detach().to(per_anchor.dtype)
        loss = (per_anchor * w).sum() / w.sum().clamp_min(1e-12)
    return loss


class KLLogitLoss(nn.Module):
    """Module form of :func:`kl_logit_loss` (registry name ``'kl'``)."""

    def __init__(self, temperature: float = 1.0, mode: KLMode = "sigmoid") -> None:
        super().__init__()
        _check_kl_args(temperature, mode)
        self.temperature = temperature
        self.mode: KLMode = mode

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        return kl_logit_loss(
            student_logits, teacher_logits, temperature=self.temperature, mode=self.mode, mask=mask
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mode={self.mode!r}"
