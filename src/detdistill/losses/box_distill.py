"""Box-regression distillation toward another head's predictions, weighted by its confidence.

Used by ScaleKD (Zhu et al., CVPR 2023) to distil the cross-scale assistant's box outputs
into the student's, and by the ``box`` method to distil a teacher's. Both heads predict in
the same format for the same anchors, so the outputs can be compared element-wise. Most
anchors are background, where a box output means nothing; each anchor is therefore weighted
by the target head's foreground confidence ``w_a = max_c sigmoid(z_{a,c})``::

    L = sum_a w_a * mean_k smoothL1(b^S_{a,k} - b^T_{a,k}) / (sum_a w_a + eps)

Heads that predict each box side as a distribution over bins (YOLOv8's DFL) are compared as
distributions instead, as in Localization Distillation (Zheng et al., CVPR 2022)::

    L = sum_a w_a * mean_side T^2 KL(softmax(d^T_side / T) || softmax(d^S_side / T)) / (sum_a w_a + eps)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .kl import kl_logit_loss


def weighted_box_distill_loss(student_boxes: Tensor, target_boxes: Tensor, weights: Tensor, beta: float = 1.0,
                              eps: float = 1e-6) -> Tensor:
    """Args: ``student_boxes`` / ``target_boxes`` ``(N, A, K)``; ``weights`` ``(N, A)`` non-negative
    (detached here, as are the targets). Returns a scalar; 0 when every weight is 0."""
    if student_boxes.shape != target_boxes.shape:
        raise ValueError(f"box predictions differ in shape: {tuple(student_boxes.shape)} vs {tuple(target_boxes.shape)}")
    if weights.shape != student_boxes.shape[:-1]:
        raise ValueError(f"weights {tuple(weights.shape)} must be {tuple(student_boxes.shape[:-1])}")
    per_anchor = F.smooth_l1_loss(student_boxes, target_boxes.detach(), beta=beta, reduction="none").mean(-1)
    w = weights.detach().to(per_anchor.dtype)
    return (per_anchor * w).sum() / (w.sum() + eps)


class WeightedBoxDistillLoss(nn.Module):
    """Module form of :func:`weighted_box_distill_loss`."""

    def __init__(self, beta: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps

    def forward(self, student_boxes: Tensor, target_boxes: Tensor, weights: Tensor) -> Tensor:
        return weighted_box_distill_loss(student_boxes, target_boxes, weights, beta=self.beta, eps=self.eps)


def weighted_distribution_distill_loss(student_logits: Tensor, target_logits: Tensor, weights: Tensor, sides: int = 4,
                                       temperature: float = 1.0) -> Tensor:
    """Args: ``student_logits`` / ``target_logits`` ``(N, A, sides * bins)``, the bins of side ``k``
    at ``k * bins ... (k + 1) * bins - 1`` (ultralytics' DFL layout); ``weights`` ``(N, A)``
    non-negative (detached here, as are the targets). Returns a scalar; 0 when every weight is 0."""
    if student_logits.shape != target_logits.shape:
        raise ValueError(f"box distributions differ in shape: {tuple(student_logits.shape)} vs {tuple(target_logits.shape)}")
    n, a, k = student_logits.shape
    if k % sides:
        raise ValueError(f"{k} box logits per anchor do not split into {sides} sides")
    if weights.shape != (n, a):
        raise ValueError(f"weights {tuple(weights.shape)} must be {(n, a)}")
    # each side is one softmax distribution; every side of an anchor carries the anchor's weight
    per_side = (n, a * sides, k // sides)
    mask = weights.detach().unsqueeze(-1).expand(n, a, sides).reshape(n, a * sides)
    return kl_logit_loss(student_logits.reshape(per_side), target_logits.reshape(per_side), temperature=temperature,
                         mode="softmax", mask=mask.to(student_logits.dtype))
