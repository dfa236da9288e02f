"""Bipartite matching of a DETR's predictions to a target set, and the DETR set-loss pieces.

Used by DETRDistill's Hungarian-matching logits distillation (Chang et al., ICCV 2023), where
the target set is the teacher's predictions. Boxes are ``cxcywh`` normalised to the image, as
the DETR family predicts them; box geometry comes from ``torchvision.ops`` (transformers'
``HungarianMatcher`` builds one cost for every target, but DETRDistill's negative targets have
no class cost, so the costs are assembled here and solved with scipy's
``linear_sum_assignment``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision import ops
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["focal_class_cost", "box_cost", "hungarian", "sigmoid_focal_loss", "box_losses"]


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    r"""Deformable DETR's focal matching cost of each prediction for each target's class.

    .. math:: c_{qk} = \alpha (1 - p)^\gamma (-\log p) - (1 - \alpha) p^\gamma (-\log(1 - p)),
       \quad p = \sigma(z_{q, y_k})

    Args:
        logits: ``(Q, C)`` class logits.
        labels: ``(K,)`` target classes.
    Returns:
        ``(Q, K)`` costs (lower = better).
    """
    p = logits.float().sigmoid()[:, labels]
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    return pos - neg


def box_cost(boxes: Tensor, targets: Tensor, l1: float = 5.0, giou: float = 2.0) -> Tensor:
    r"""``l1 · ||b_q - t_k||_1 - giou · GIoU(b_q, t_k)`` for every pair: ``(Q, 4), (K, 4) -> (Q, K)``."""
    b, t = boxes.float(), targets.float()
    cost = l1 * torch.cdist(b, t, p=1)
    if giou:
        cost = cost - giou * generalized_box_iou(box_convert(b, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy"))
    return cost


def hungarian(cost: Tensor, allowed_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The minimum-cost one-to-one assignment of a ``(Q, K)`` cost matrix.

    Args:
        cost: ``(Q, K)``; ``min(Q, K)`` pairs are assigned.
        allowed_rows: ``(Q,)`` bool, rows (predictions) that may be assigned; ``None``: all.
    Returns:
        ``(rows, cols)``: int64 index tensors of the assigned pairs, sorted by row.
    """
    rows = torch.arange(cost.shape[0]) if allowed_rows is None else allowed_rows.nonzero().flatten().cpu()
    if cost.shape[1] == 0 or len(rows) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    sub = cost.detach().cpu()[rows].numpy().astype(np.float64)
    r, c = linear_sum_assignment(sub)
    r_t, c_t = rows[torch.as_tensor(r, dtype=torch.int64)], torch.as_tensor(c, dtype=torch.int64)
    order = r_t.argsort()
    return r_t[order], c_t[order]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    r"""Summed sigmoid focal loss (Lin et al., 2017) of ``logits`` against (soft) ``targets``, same shape:
    ``torchvision.ops.sigmoid_focal_loss`` in float32.

    .. math:: \sum -\alpha_t (1 - p_t)^\gamma \log p_t
    """
    return ops.sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="sum")


def box_losses(boxes: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed L1 and ``1 - GIoU`` of matched pairs ``(P, 4), (P, 4)`` (cxcywh)."""
    if len(boxes) == 0:
        zero = boxes.sum() * 0.0
        return zero, zero
    b, t = boxes.float(), targets.float()
    l1 = (b - t).abs().sum()
    giou = generalized_box_iou(box_convert(b, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy")).diagonal()
    return l1, (1 - giou).sum()
