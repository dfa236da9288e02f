"""Logit KD on dense heads: KL divergence between softened class predictions, per anchor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...adapters.base import DetectorAdapter, probe_raw_outputs
from ...config import DistillTermConfig
from ...losses.kl import KLLogitLoss
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method


def _logit_layout(adapter: DetectorAdapter, model: nn.Module, size: int) -> tuple[int, ...] | None:
    """``(A, C)`` of the dense class logits on a blank ``size`` x ``size`` image (eval mode)."""
    raw = probe_raw_outputs(adapter, model, size)
    return tuple(raw.cls_logits.shape[1:]) if raw.cls_logits is not None else None


@register_method
class KLLogits(DistillMethod):
    """``KL(softmax|sigmoid(z_T / T) || ... (z_S / T)) * T^2`` on ``(N, A, C)`` class logits.

    Student and teacher need the same dense head layout (anchors per location, levels,
    classes) and input size, so that anchor ``a`` means the same place in both.
    """

    name = "kl"
    family = "logit"
    default_weight = 1.0
    paper = "Hinton et al. (2015) KD with temperature, on dense-head class logits"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) works on head logits; remove `pairs`")
        return Needs(teacher_head=True, student_head=True)

    @classmethod
    def params_signature(cls) -> Callable[..., Any]:
        return KLLogitLoss.__init__

    def __init__(self, ctx: BuildContext, **params: Any) -> None:
        super().__init__()
        self.label = ctx.label
        t_names = ctx.teacher_class_names
        if t_names is not None and ctx.num_classes is not None and len(t_names) != ctx.num_classes:
            raise ValueError(f"distill term {ctx.label!r} (kl): the teacher has {len(t_names)} classes {t_names} and the "
                             f"data {ctx.num_classes}; logit KD compares class k with class k")
        if ctx.teacher is not None and ctx.teacher_adapter is not None:  # layouts, on one blank image each
            s = _logit_layout(ctx.student_adapter, ctx.student, 256)
            t = _logit_layout(ctx.teacher_adapter, ctx.teacher, round(256 * ctx.teacher_input_scale))
            if s != t:
                raise ValueError(f"distill term {ctx.label!r} (kl): on a 256 px image the student's head gives logits "
                                 f"{s} (anchors, classes) and the teacher's {t} at input scale {ctx.teacher_input_scale}; "
                                 "logit KD needs the same head layout (anchors per location, levels, classes) and "
                                 "input size. Use a feature method for this pair")
        self.loss_fn = KLLogitLoss(**params)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        s = ctx.student_raw.cls_logits if ctx.student_raw is not None else None
        t = ctx.teacher_raw.cls_logits if ctx.teacher_raw is not None else None
        if s is None or t is None:
            who = "student" if s is None else "teacher"
            raise ValueError(f"distill term {self.label!r}: the {who} has no dense class logits (a two-stage detector?); "
                             "logit KD needs FCOS/RetinaNet/YOLO heads on both sides; use a feature method")
        if s.shape != t.shape:
            raise ValueError(f"distill term {self.label!r}: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ; logit KD needs the same head layout "
                             "(anchors per location, levels, classes) and input size")
        return {"": self.loss_fn(s, t.detach())}
