"""DETRDistill's query-prior assignment distillation (Chang et al., ICCV 2023).

A DETR's bipartite matching is unstable early in training: the same query is matched to
different objects from step to step, which slows convergence. The teacher's matching is
stable, so its queries are given to the student as a prior:

1. the teacher's decoder inputs (content queries, reference points and, for Deformable DETR,
   positional queries; projected to the student's width by trainable linears) run through the
   student's decoder as an **extra group**, in a separate pass over the student's own encoder
   output, during training only (the adapter's ``query_group`` input);
2. the teacher's final predictions are matched to the ground truth (Hungarian; costs class 1
   (focal), L1 5, GIoU 2): teacher query ``k`` gets object ``g``;
3. the student's group query ``k`` is supervised with object ``g`` at every decoder layer,
   with the DETR set losses (focal 1, L1 5, GIoU 2, divided by the number of objects):

   .. math:: L = \\sum_l \\frac{1}{G} \\Big[ \\mathrm{focal}(z^{(l)}, y_{\\sigma_T}) + \\sum_{k \\to g}
             5 \\|b^{(l)}_k - g\\|_1 + 2 (1 - \\mathrm{GIoU}(b^{(l)}_k, g)) \\Big]

   where ``σ_T`` is the *teacher's* assignment (the official code computes it and then, by a
   bug, supervises the group with the student's own matcher; the paper's assignment is used here).

The group never runs at inference and is not part of the exported student; no contrastive head
(the official code's, undescribed in the paper) is added.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ...adapters.base import probe_raw_outputs
from ...config import DistillTermConfig
from ...losses.set_matching import box_cost, box_losses, focal_class_cost, hungarian, sigmoid_focal_loss
from ...structures import QueryGroup
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method
from .detr import teacher_boxes_in_student_frame


def _normalised_gt(boxes_xyxy: Tensor, frame: tuple[int, int]) -> Tensor:
    h, w = frame
    return box_convert(boxes_xyxy.float(), "xyxy", "cxcywh") / boxes_xyxy.new_tensor([w, h, w, h]).float()


@register_method
class DetrQueryPrior(DistillMethod):
    """The teacher's queries as an extra student query group, supervised with the teacher's
    assignment to the ground truth; parts ``cls`` and ``box``, summed over decoder layers."""

    name = "detr_query_prior"
    family = "query"
    default_weight = 1.0
    paper = "Chang et al., DETRDistill (ICCV 2023): query-prior assignment distillation"
    student_requires = "detr"
    teacher_requires = "detr"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) works on decoder queries; remove `pairs`")
        return Needs(teacher_head=True, student_head=True, teacher_first=True)

    def __init__(self, ctx: BuildContext, class_cost: float = 1.0, l1_cost: float = 5.0, giou_cost: float = 2.0,
                 class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.part_names = ("cls", "box")
        self.label = ctx.label
        self.costs = (class_cost, l1_cost, giou_cost)
        self.weights = (class_weight, l1_weight, giou_weight)
        self.focal = (focal_alpha, focal_gamma)
        self.teacher_input_scale = ctx.teacher_input_scale
        assert ctx.teacher is not None and ctx.teacher_adapter is not None
        s = probe_raw_outputs(ctx.student_adapter, ctx.student, 128)
        t = probe_raw_outputs(ctx.teacher_adapter, ctx.teacher, 128)
        for raw, role in ((s, "student"), (t, "teacher")):
            if raw.decoder_queries is None:
                raise ValueError(f"distill term {ctx.label!r} ({self.name}): the {role} has no decoder that takes a "
                                 "query group; query priors work with deformable_detr and rt_detr (v2) DETRs")
        sq, tq = s.decoder_queries, t.decoder_queries
        if sq.kind != tq.kind or sq.reference_points.shape[-1] != tq.reference_points.shape[-1]:
            raise ValueError(f"distill term {ctx.label!r} ({self.name}): the teacher's queries ({tq.kind}, reference "
                             f"points of {tq.reference_points.shape[-1]}) do not fit the student's decoder ({sq.kind}, "
                             f"{sq.reference_points.shape[-1]}); query priors need the same DETR architecture")
        if s.layer_logits[-1].shape[-1] != t.layer_logits[-1].shape[-1]:
            raise ValueError(f"distill term {ctx.label!r} ({self.name}): student and teacher classes differ")
        d_s, d_t = sq.embeds.shape[-1], tq.embeds.shape[-1]
        # the teacher's queries in the student's width: trained with the student, never exported
        self.embed_proj = nn.Linear(d_t, d_s) if d_t != d_s else nn.Identity()
        self.position_proj = nn.Linear(d_t, d_s) if d_t != d_s and tq.position is not None else nn.Identity()

    def student_inputs(self, ctx: StepContext) -> dict[str, Any]:
        t = ctx.teacher_raw
        assert t is not None and t.decoder_queries is not None
        q = t.decoder_queries
        position = self.position_proj(q.position.detach()) if q.position is not None else None
        return {"query_group": QueryGroup(q.kind, self.embed_proj(q.embeds.detach()), q.reference_points.detach(),
                                          position)}

    @torch.no_grad()
    def teacher_assignment(self, ctx: StepContext) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image: (teacher query indices, their ground-truth boxes (normalised cxcywh in the
        student's frame), their labels), from the teacher's final predictions."""
        s, t = ctx.student_raw, ctx.teacher_raw
        assert s is not None and t is not None and t.layer_logits is not None
        t_boxes = teacher_boxes_in_student_frame(t.layer_boxes[-1], t.box_frame, s.box_frame, self.teacher_input_scale)
        out = []
        for n, target in enumerate(ctx.batch.targets):
            gt = _normalised_gt(target.boxes, s.box_frame[n])
            cost = self.costs[0] * focal_class_cost(t.layer_logits[-1][n], target.labels) \
                + box_cost(t_boxes[n], gt, self.costs[1], self.costs[2])
            rows, cols = hungarian(cost)
            out.append((rows.to(gt.device), gt[cols.to(gt.device)], target.labels[cols.to(gt.device)]))
        return out

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        s = ctx.student_raw
        assert s is not None
        if s.group_layer_logits is None or s.group_layer_boxes is None:
            raise RuntimeError(f"distill term {self.label!r}: the student's forward did not run the query group")
        assignment = self.teacher_assignment(ctx)
        n_obj = max(sum(len(a[0]) for a in assignment), 1)
        cls_w, l1_w, giou_w = self.weights
        cls_total = box_total = None
        for logits, boxes in zip(s.group_layer_logits, s.group_layer_boxes):
            target = torch.zeros_like(logits, dtype=torch.float32)
            matched_pred, matched_gt = [], []
            for n, (q, gt, labels) in enumerate(assignment):
                target[n, q, labels] = 1.0
                matched_pred.append(boxes[n, q])
                matched_gt.append(gt)
            cls = cls_w * sigmoid_focal_loss(logits, target, *self.focal) / n_obj
            l1, giou = box_losses(torch.cat(matched_pred), torch.cat(matched_gt))
            box = (l1_w * l1 + giou_w * giou) / n_obj
            cls_total = cls if cls_total is None else cls_total + cls
            box_total = box if box_total is None else box_total + box
        return {"cls": cls_total, "box": box_total}
