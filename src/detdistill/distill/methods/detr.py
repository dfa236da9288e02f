"""DETRDistill (Chang et al., ICCV 2023) for the DETR family: Hungarian-matching logits and
target-aware features. (The third part, query-prior assignment, is in ``detr_query.py``.)

Both read the DETR-specific fields of :class:`~detdistill.structures.RawOutputs`
(``layer_logits``, ``layer_boxes``, ``queries``, ``box_frame``), which the transformers adapter
fills; a model without them (a CNN) is refused when the method is built, naming the side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert

from ...adapters.base import probe_raw_outputs
from ...config import DistillTermConfig
from ...losses.hungarian_logits import HungarianLogitLoss
from ...losses.target_aware import query_quality, target_aware_loss, target_aware_mask
from ...structures import RawOutputs
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method
from .feature import connector_key, map_connectors


def layer_mapping(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher decoder layer that teaches each student layer: evenly spaced, last to last.

    ``student j -> teacher round(j · (L_T - 1) / (L_S - 1))``; one student layer takes the
    teacher's last. Equal depths map ``i -> i``; e.g. 3 student and 6 teacher layers map to
    teacher layers 0, 2 (2.5 rounds to even), 5.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"decoder depths must be >= 1, got student {student_layers}, teacher {teacher_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(j * (teacher_layers - 1) / (student_layers - 1)) for j in range(student_layers)]


def _require_detr(raw: RawOutputs, label: str, role: str, method: str) -> None:
    if raw.layer_logits is None or raw.layer_boxes is None or raw.queries is None or raw.box_frame is None:
        raise ValueError(f"distill term {label!r} ({method}): the {role} is not a DETR (no per-decoder-layer logits, "
                         "boxes and queries); use a transformers DETR (framework: transformers)")
    if raw.class_activation != "sigmoid":
        raise ValueError(f"distill term {label!r} ({method}): the {role} classifies with a softmax over C + 1 classes "
                         "(plain DETR); DETRDistill's losses need sigmoid class logits: use conditional_detr, "
                         "deformable_detr or rt_detr")


def teacher_boxes_in_student_frame(t_boxes: Tensor, t_frame: list[tuple[int, int]], s_frame: list[tuple[int, int]],
                                   teacher_input_scale: float) -> Tensor:
    """``(N, Q, 4)`` teacher cxcywh normalised to its frames -> normalised to the student's frames."""
    t = t_boxes.new_tensor([[w, h, w, h] for h, w in t_frame])[:, None]
    s = t_boxes.new_tensor([[w, h, w, h] for h, w in s_frame])[:, None]
    return t_boxes * t / teacher_input_scale / s


@register_method
class DetrLogits(DistillMethod):
    """Hungarian-matching logits distillation, per decoder layer (teacher layer ``m(j)`` teaches
    student layer ``j``, :func:`layer_mapping`); parts ``cls``, ``box_pos``, ``box_neg`` summed
    over layers (``"soft"`` mode: ``cls``, ``box``). See :mod:`detdistill.losses.hungarian_logits`."""

    name = "detr_logits"
    family = "logit"
    default_weight = 1.0
    student_requires = "detr"
    teacher_requires = "detr"
    paper = "Chang et al., DETRDistill (ICCV 2023): Hungarian-matching logits distillation"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) works on decoder outputs; remove `pairs`")
        return Needs(teacher_head=True, student_head=True)

    @classmethod
    def params_signature(cls) -> Callable[..., Any]:
        return HungarianLogitLoss.__init__

    def __init__(self, ctx: BuildContext, **params: Any) -> None:
        super().__init__()
        self.label = ctx.label
        self.loss_fn = HungarianLogitLoss(**params)
        self.part_names = ("cls", "box") if self.loss_fn.kwargs["mode"] == "soft" else ("cls", "box_pos", "box_neg")
        assert ctx.teacher is not None and ctx.teacher_adapter is not None
        s = probe_raw_outputs(ctx.student_adapter, ctx.student, 128)
        t = probe_raw_outputs(ctx.teacher_adapter, ctx.teacher, 128)
        _require_detr(s, ctx.label, "student", self.name)
        _require_detr(t, ctx.label, "teacher", self.name)
        if s.layer_logits[-1].shape[-1] != t.layer_logits[-1].shape[-1]:
            raise ValueError(f"distill term {ctx.label!r} ({self.name}): the student has {s.layer_logits[-1].shape[-1]} "
                             f"classes and the teacher {t.layer_logits[-1].shape[-1]}; the teacher's classes are the "
                             "student's pseudo labels, so they must be the same classes")
        self.mapping = layer_mapping(len(s.layer_logits), len(t.layer_logits))
        self.teacher_input_scale = ctx.teacher_input_scale

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        s, t = ctx.student_raw, ctx.teacher_raw
        assert s is not None and t is not None and s.layer_logits is not None and t.layer_logits is not None
        totals: dict[str, Tensor] = {}
        for j, i in enumerate(self.mapping):
            t_boxes = teacher_boxes_in_student_frame(t.layer_boxes[i], t.box_frame, s.box_frame, self.teacher_input_scale)
            parts = self.loss_fn(s.layer_logits[j], s.layer_boxes[j], t.layer_logits[i], t_boxes.clamp(0, 1))
            for k, v in parts.items():
                totals[k] = totals[k] + v if k in totals else v
        return totals


@register_method
class DetrTargetAwareFeature(DistillMethod):
    """Target-aware feature distillation: ``MSE(ψ·F_T, ψ·connector(F_S))`` per ``[student, teacher]``
    tap pair, with ψ built from the teacher's top queries (:mod:`detdistill.losses.target_aware`).

    The teacher must be a DETR and its taps its ``d_model``-wide maps (the official code: the
    input projections, ``neck.pK``); the student can be any detector (a CNN's FPN levels too),
    through connectors."""

    name = "detr_feature"
    family = "feature"
    default_weight = 1.0
    teacher_requires = "detr"
    paper = "Chang et al., DETRDistill (ICCV 2023): target-aware feature distillation"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if not term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) needs `pairs` of [student, teacher] maps, "
                             "e.g. [[neck.p3, neck.p3], [neck.p4, neck.p4], [neck.p5, neck.p5]]")
        return Needs(student_taps=tuple(s for s, _ in term.pairs), teacher_taps=tuple(t for _, t in term.pairs),
                     teacher_head=True)

    def __init__(self, ctx: BuildContext, top_k: int = 100, clamp_min: float = 1e-2) -> None:
        super().__init__()
        if top_k < 1 or not 0.0 < clamp_min < 1.0:
            raise ValueError(f"distill term {ctx.label!r} ({self.name}): top_k must be >= 1 and clamp_min in (0, 1)")
        self.label, self.top_k, self.clamp_min = ctx.label, top_k, clamp_min
        self.pairs = [tuple(p) for p in ctx.term.pairs]
        assert ctx.teacher is not None and ctx.teacher_adapter is not None
        t = probe_raw_outputs(ctx.teacher_adapter, ctx.teacher, 128)
        _require_detr(t, ctx.label, "teacher", self.name)
        width = t.queries.shape[-1]
        self.connectors = map_connectors(ctx, self.name)
        for _, t_tap in self.pairs:
            if ctx.teacher_taps[t_tap].channels != width:
                raise ValueError(f"distill term {ctx.label!r}: teacher tap {t_tap!r} has {ctx.teacher_taps[t_tap].channels} "
                                 f"channels but the teacher's queries {width}; the mask compares queries with "
                                 "d_model-wide maps (the input projections neck.pK, or encoder.pK)")
        self.teacher_input_scale = ctx.teacher_input_scale

    @torch.no_grad()
    def _qualities(self, ctx: StepContext) -> list[tuple[Tensor, Tensor]]:
        t = ctx.teacher_raw
        assert t is not None and t.layer_logits is not None and t.layer_boxes is not None and t.box_frame is not None
        out = []
        for n, target in enumerate(ctx.batch.targets):
            h, w = t.box_frame[n]
            boxes = box_convert(t.layer_boxes[-1][n].float(), "cxcywh", "xyxy") * torch.tensor(
                [w, h, w, h], device=target.boxes.device, dtype=torch.float32) / self.teacher_input_scale
            q, quality = query_quality(t.layer_logits[-1][n], boxes, target.boxes, self.top_k)
            out.append((t.queries[n, q], quality))
        return out

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.teacher_taps is not None
        selected = self._qualities(ctx)
        total = None
        for s_tap, t_tap in self.pairs:
            target = ctx.teacher_taps.get(t_tap).detach()
            with torch.no_grad():
                mask = torch.stack([target_aware_mask(target[n], q, quality, self.clamp_min)
                                    for n, (q, quality) in enumerate(selected)])
            student = self.connectors[connector_key(s_tap, t_tap)](ctx.student_taps.get(s_tap), target.shape[-2:])
            value = target_aware_loss(student, target, mask)
            total = value if total is None else total + value
        return {"": total}
