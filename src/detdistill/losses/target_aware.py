r"""DETRDistill's target-aware feature distillation (Chang et al., ICCV 2023).

The teacher's decoder queries say where the objects are. Each selected query ``q`` votes for
the map positions whose teacher feature points the same way, weighted by the query's quality
(how good a prediction it is):

.. math::
    \psi_{hw} = \sum_{q} s_q \cdot \big\langle \tfrac{q}{\|q\|}, \tfrac{F^T_{hw}}{\|F^T_{hw}\|} \big\rangle,
    \qquad s_q = \text{score}_q \cdot \max_g \mathrm{IoU}(b_q, g)

The mask is clamped below at ``clamp_min`` (the official code: 1e-2, which also drops
negative similarities), divided by its per-image maximum, and the loss is

.. math:: L = \frac{1}{N C H W} \sum (\psi \odot F^T - \psi \odot F^S)^2

per level, summed over levels. The selected queries are the top-``k`` (query, class) pairs
of the teacher's last decoder layer by sigmoid score (official code: ``k`` = 100); with no
ground truth in an image its quality is the score alone.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["query_quality", "target_aware_mask", "target_aware_loss"]


def query_quality(logits: Tensor, boxes_xyxy: Tensor, gt_xyxy: Tensor, top_k: int = 100) -> tuple[Tensor, Tensor]:
    """The top-``k`` (query, class) pairs of one image and their quality.

    Args:
        logits: ``(Q, C)`` teacher class logits (sigmoid classes).
        boxes_xyxy: ``(Q, 4)`` teacher boxes in pixels of the student's input.
        gt_xyxy: ``(G, 4)`` ground-truth boxes, same frame.
        top_k: pairs kept (a query may appear once per class).
    Returns:
        ``(query index (k,), quality (k,))``: score times the max plain IoU with any ground-truth
        box, or the score alone when ``G = 0``.
    """
    scores = logits.float().sigmoid().flatten()
    k = min(top_k, scores.numel())
    top, flat = scores.topk(k)
    q = flat // logits.shape[-1]
    if len(gt_xyxy) == 0:
        return q, top
    iou = box_iou(boxes_xyxy[q].float(), gt_xyxy.float()).max(1).values
    return q, top * iou


def target_aware_mask(feature: Tensor, queries: Tensor, quality: Tensor, clamp_min: float = 1e-2) -> Tensor:
    """``(C, H, W)`` teacher map, ``(K, C)`` selected queries and ``(K,)`` qualities -> ``(H, W)`` mask in
    ``[clamp_min / max, 1]`` (see the module docstring)."""
    if queries.shape[-1] != feature.shape[0]:
        raise ValueError(f"queries of width {queries.shape[-1]} against a teacher map of {feature.shape[0]} channels: "
                         "the mask compares the teacher's queries with the teacher's own d_model-wide maps")
    f = F.normalize(feature.float().flatten(1), dim=0)  # (C, HW): unit vector per position
    q = F.normalize(queries.float(), dim=-1)  # (K, C)
    mask = (quality.float()[:, None] * (q @ f)).sum(0).clamp(min=clamp_min)  # (HW,)
    return (mask / mask.max()).view(feature.shape[-2:])


def target_aware_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``mean((mask·F_T - mask·F_S)^2)`` with ``(N, C, H, W)`` maps and an ``(N, H, W)`` mask."""
    if student.shape != teacher.shape or mask.shape != (teacher.shape[0], *teacher.shape[-2:]):
        raise ValueError(f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and mask {tuple(mask.shape)} "
                         "do not fit: (N, C, H, W) maps and an (N, H, W) mask")
    m = mask[:, None].to(teacher.dtype)
    return F.mse_loss(student * m, teacher.detach() * m)
