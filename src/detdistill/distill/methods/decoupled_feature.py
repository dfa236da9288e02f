"""Foreground / background-decoupled L2 imitation (:mod:`detdistill.losses.decoupled_feature`).

The same pairs and connectors as the other feature methods; the loss also takes the cells of the
batch's ground-truth boxes on each teacher map, so the objects and the background are averaged
separately and weighted by ``params: {fg_weight, bg_weight}``.
"""

from __future__ import annotations

from torch import Tensor

from ...losses.decoupled_feature import DecoupledL2Loss, box_foreground_mask
from ..method import StepContext, register_method
from .feature import FeatureImitation, connector_key


@register_method
class DecoupledL2Imitation(FeatureImitation):
    """L2 averaged over the boxes' cells and over the rest separately (``fg_weight``, ``bg_weight``)."""

    name = "l2_decoupled"
    loss = DecoupledL2Loss
    default_weight = 1.0
    paper = "Guo et al., DeFeat (CVPR 2021): foreground and background features distilled apart"

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.teacher_taps is not None and ctx.student_raw is not None and ctx.student_raw.input_size is not None
        boxes = [t.boxes for t in ctx.batch.targets]
        total = None
        for s, t in self.pairs:
            target = ctx.teacher_taps.get(t).detach()
            student = self.connectors[connector_key(s, t)](ctx.student_taps.get(s), target.shape[-2:])
            mask = box_foreground_mask(boxes, ctx.student_raw.input_size, target.shape[-2:]).to(target.device)
            value = self.loss_fn(student, target, mask)
            total = value if total is None else total + value
        return {"": total}
