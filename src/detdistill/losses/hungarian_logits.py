r"""DETRDistill's Hungarian-matching logits distillation for one decoder layer (Chang et al., ICCV 2023).

DETR predictions are an unordered set, so the teacher's predictions are treated as pseudo
ground truth and matched one-to-one to the student's, then the DETR set losses apply to the
matched pairs. Two target modes:

``"paper"`` (default; the paper's positive + negative distillation)
    Positives ``P`` are the teacher's queries whose top class score is at least
    ``positive_threshold``; negatives ``N`` are the rest. Positives are matched first with the
    cost ``class_cost · focal + l1_cost · L1 - giou_cost · GIoU`` (class = the teacher's top
    class); negatives are then matched to the remaining student queries with the box terms only
    (their class is background). With ``Q_S`` student queries, ``min(Q_S, |P|)`` positives and
    then ``min(Q_S - matched, |N|)`` negatives are assigned.

    .. math::
        L = \frac{1}{|P|} \Big[ \mathrm{focal}(z_S, y) + 5\,\|b_S - b_T\|_1^{P} + 2\,(1 - \mathrm{GIoU})^{P} \Big]
          + \frac{w_{neg}}{|N|} \Big[ 5\,\|b_S - b_T\|_1^{N} + 2\,(1 - \mathrm{GIoU})^{N} \Big]

    where the focal term runs over *every* student query and class, with target ``y`` = the
    teacher's one-hot top class for queries matched to positives and 0 (background) for all
    others, exactly as a Deformable DETR's classification loss treats unmatched queries.
``"soft"`` (the official code's variant)
    Every teacher query is a target. The matching cost's class term is the summed BCE of the
    student's logits against the teacher's probabilities; matched pairs get that BCE as their
    class loss and the L1 / GIoU box terms, all divided by the number of pairs.

Batch sums are normalised once over the batch (counts summed over images), as DETR does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .set_matching import box_cost, box_losses, focal_class_cost, hungarian, sigmoid_focal_loss

__all__ = ["hungarian_logit_loss", "match_to_teacher", "HungarianLogitLoss"]

Mode = Literal["paper", "soft"]


def match_to_teacher(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, *, mode: Mode = "paper",
                     positive_threshold: float = 0.3, class_cost: float = 1.0, l1_cost: float = 5.0,
                     giou_cost: float = 2.0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """One image's assignment of student queries to teacher queries.

    Args:
        s_logits: ``(Q_S, C)`` student class logits; s_boxes: ``(Q_S, 4)`` cxcywh.
        t_logits: ``(Q_T, C)`` teacher class logits; t_boxes: ``(Q_T, 4)`` cxcywh.
    Returns:
        ``((s_pos, t_pos), (s_neg, t_neg))``: index pairs matched to positive and to negative
        teacher queries (``"soft"`` mode puts every pair under positives).
    """
    t_prob = t_logits.float().sigmoid()
    if mode == "soft":
        # summed BCE(z_q, p_k) over classes for every pair: sum_c softplus(z_qc) - z_qc p_kc
        z = s_logits.float()
        bce = F.softplus(z).sum(-1, keepdim=True) - z @ t_prob.T
        cost = class_cost * bce + box_cost(s_boxes, t_boxes, l1_cost, giou_cost)
        empty = torch.zeros(0, dtype=torch.int64)
        return hungarian(cost), (empty, empty)
    score, label = t_prob.max(-1)
    pos = (score >= positive_threshold).nonzero().flatten().cpu()
    neg = (score < positive_threshold).nonzero().flatten().cpu()
    cost = class_cost * focal_class_cost(s_logits, label[pos]) + box_cost(s_boxes, t_boxes[pos], l1_cost, giou_cost)
    s_pos, c_pos = hungarian(cost)
    t_pos = pos[c_pos]
    free = torch.ones(len(s_logits), dtype=torch.bool)
    free[s_pos] = False
    s_neg, c_neg = hungarian(box_cost(s_boxes, t_boxes[neg], l1_cost, giou_cost), allowed_rows=free)
    return (s_pos, t_pos), (s_neg, neg[c_neg])


def hungarian_logit_loss(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, *, mode: Mode = "paper",
                         positive_threshold: float = 0.3, negative_weight: float = 1.0, class_cost: float = 1.0,
                         l1_cost: float = 5.0, giou_cost: float = 2.0, class_weight: float = 1.0,
                         l1_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                         focal_gamma: float = 2.0) -> dict[str, Tensor]:
    """The loss of one decoder layer pair over a batch (see the module docstring for the equation).

    Args:
        s_logits: ``(N, Q_S, C)`` student logits (sigmoid classes); s_boxes: ``(N, Q_S, 4)`` cxcywh in [0, 1].
        t_logits: ``(N, Q_T, C)`` teacher logits; t_boxes: ``(N, Q_T, 4)``. Not differentiated.
    Returns:
        ``{"cls", "box_pos", "box_neg"}`` (``"soft"``: ``{"cls", "box"}``), each a scalar.
    """
    if s_logits.shape[0] != t_logits.shape[0] or s_logits.shape[-1] != t_logits.shape[-1]:
        raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)}: "
                         "the batch size and the number of classes must agree")
    t_logits, t_boxes = t_logits.detach(), t_boxes.detach()
    n_img = s_logits.shape[0]
    cls_target = torch.zeros_like(s_logits, dtype=torch.float32)
    pairs_pos: list[tuple[Tensor, Tensor]] = []
    pairs_neg: list[tuple[Tensor, Tensor]] = []
    n_pos = n_neg = 0
    soft_cls = s_logits.sum() * 0.0
    for i in range(n_img):
        (sp, tp), (sn, tn) = match_to_teacher(s_logits[i], s_boxes[i], t_logits[i], t_boxes[i], mode=mode,
                                              positive_threshold=positive_threshold, class_cost=class_cost,
                                              l1_cost=l1_cost, giou_cost=giou_cost)
        dev = s_logits.device
        sp, tp, sn, tn = sp.to(dev), tp.to(dev), sn.to(dev), tn.to(dev)
        if mode == "soft":
            soft_cls = soft_cls + F.binary_cross_entropy_with_logits(
                s_logits[i, sp].float(), t_logits[i, tp].float().sigmoid(), reduction="sum")
        else:
            cls_target[i, sp, t_logits[i, tp].argmax(-1)] = 1.0
        pairs_pos.append((s_boxes[i, sp], t_boxes[i, tp]))
        pairs_neg.append((s_boxes[i, sn], t_boxes[i, tn]))
        n_pos += len(sp)
        n_neg += len(sn)
    l1_p, giou_p = box_losses(torch.cat([p[0] for p in pairs_pos]), torch.cat([p[1] for p in pairs_pos]))
    box_pos = (l1_weight * l1_p + giou_weight * giou_p) / max(n_pos, 1)
    if mode == "soft":
        return {"cls": class_weight * soft_cls / max(n_pos, 1), "box": box_pos}
    cls = class_weight * sigmoid_focal_loss(s_logits, cls_target, focal_alpha, focal_gamma) / max(n_pos, 1)
    l1_n, giou_n = box_losses(torch.cat([p[0] for p in pairs_neg]), torch.cat([p[1] for p in pairs_neg]))
    box_neg = negative_weight * (l1_weight * l1_n + giou_weight * giou_n) / max(n_neg, 1)
    return {"cls": cls, "box_pos": box_pos, "box_neg": box_neg}


class HungarianLogitLoss(nn.Module):
    """Module form of :func:`hungarian_logit_loss` (same arguments and defaults)."""

    def __init__(self, mode: Mode = "paper", positive_threshold: float = 0.3, negative_weight: float = 1.0,
                 class_cost: float = 1.0, l1_cost: float = 5.0, giou_cost: float = 2.0, class_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        super().__init__()
        if mode not in ("paper", "soft"):
            raise ValueError(f"mode must be 'paper' or 'soft', got {mode!r}")
        if not 0.0 < positive_threshold <= 1.0:
            raise ValueError(f"positive_threshold must be in (0, 1], got {positive_threshold}")
        self.kwargs = dict(mode=mode, positive_threshold=positive_threshold, negative_weight=negative_weight,
                           class_cost=class_cost, l1_cost=l1_cost, giou_cost=giou_cost, class_weight=class_weight,
                           l1_weight=l1_weight, giou_weight=giou_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma)

    def forward(self, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor) -> dict[str, Tensor]:
        return hungarian_logit_loss(s_logits, s_boxes, t_logits, t_boxes, **self.kwargs)
