"""Box KD on dense heads: the student's box predictions imitate the teacher's, per anchor,
weighted by the teacher's confidence there.

Logit KD (``kl``) passes on what the teacher thinks each anchor *is*; this passes on *where*
the teacher puts the box. Chen et al. (NeurIPS 2017) first used a teacher's regression
output as a target for a student detector; the confidence weighting is ScaleKD's box term
(Zhu et al., CVPR 2023); heads that predict each side as a distribution (YOLOv8's DFL) are
compared as distributions, as in Localization Distillation (Zheng et al., CVPR 2022). See
:mod:`detdistill.losses.box_distill` for the equations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...adapters.base import DetectorAdapter, probe_raw_outputs
from ...config import DistillTermConfig
from ...losses.box_distill import weighted_box_distill_loss, weighted_distribution_distill_loss
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method


def _smooth_l1(s: Tensor, t: Tensor, w: Tensor, *, beta: float, temperature: float) -> Tensor:
    return weighted_box_distill_loss(s, t, w, beta=beta)


def _distribution(s: Tensor, t: Tensor, w: Tensor, *, beta: float, temperature: float) -> Tensor:
    return weighted_distribution_distill_loss(s, t, w, temperature=temperature)


#: How each ``RawOutputs.box_format`` is compared, ``(student, teacher, weights, *, beta, temperature)``:
#: element-wise for regressed values, as distributions for DFL bins. A format not listed (DETR
#: boxes: use the detr_* methods) is refused.
BOX_COMPARATORS: dict[str, Callable[..., Tensor]] = {
    "fcos_ltrb": _smooth_l1,
    "retinanet_deltas": _smooth_l1,
    "yolo_dfl": _distribution,
}


def box_comparator(box_format: str | None, label: str, method: str) -> Callable[..., Tensor]:
    """The comparison for ``box_format`` from :data:`BOX_COMPARATORS`; an unsupported format is
    refused naming the term (``label``) and ``method``, so it fails at build, not mid-run."""
    if box_format not in BOX_COMPARATORS:
        raise ValueError(f"distill term {label!r} ({method}): box format {box_format!r} is not supported "
                         f"(supported: {', '.join(BOX_COMPARATORS)}); DETRs distil boxes with detr_logits")
    return BOX_COMPARATORS[box_format]


def _box_layout(adapter: DetectorAdapter, model: nn.Module, size: int) -> tuple[str | None, tuple[int, ...] | None]:
    """``(box_format, (A, K))`` of the dense box outputs on a blank ``size`` x ``size`` image."""
    raw = probe_raw_outputs(adapter, model, size)
    return raw.box_format, (tuple(raw.box_preds.shape[1:]) if raw.box_preds is not None else None)


@register_method
class BoxKD(DistillMethod):
    """``sum_a w_a * d(b^S_a, b^T_a) / sum_a w_a`` with ``w_a = max_c sigmoid(z^T_{a,c})``.

    ``d`` is the mean smooth-L1 over the box values (FCOS ltrb, RetinaNet deltas) or the mean
    KL over the four side distributions (YOLOv8 DFL). Student and teacher need the same
    dense head layout and box format, so that anchor ``a`` means the same place in both.

    Params: ``beta`` (smooth-L1 transition, default 1.0), ``temperature`` (DFL KL, default 1.0).
    """

    name = "box"
    family = "logit"
    default_weight = 1.0
    paper = "Chen et al. (NeurIPS 2017) / LD, Zheng et al. (CVPR 2022): teacher box KD on dense heads"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) works on head outputs; remove `pairs`")
        return Needs(teacher_head=True, student_head=True)

    def __init__(self, ctx: BuildContext, beta: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if not beta > 0 or not temperature > 0:
            raise ValueError(f"distill term {ctx.label!r} (box): beta and temperature must be > 0, "
                             f"got beta={beta}, temperature={temperature}")
        self.label = ctx.label
        self.beta, self.temperature = beta, temperature
        if ctx.teacher is not None and ctx.teacher_adapter is not None:  # layouts, on one blank image each
            s = _box_layout(ctx.student_adapter, ctx.student, 256)
            t = _box_layout(ctx.teacher_adapter, ctx.teacher, round(256 * ctx.teacher_input_scale))
            if s != t:
                raise ValueError(f"distill term {ctx.label!r} (box): on a 256 px image the student's head gives boxes "
                                 f"{s[0]} {s[1]} (format, (anchors, values)) and the teacher's {t[0]} {t[1]} at input "
                                 f"scale {ctx.teacher_input_scale}; box KD needs the same head layout and box format. "
                                 "Use a feature method for this pair")
            self._comparator(s[0])  # an unsupported format fails at build, not at the first step

    def _comparator(self, box_format: str | None) -> Callable[..., Tensor]:
        return box_comparator(box_format, self.label, "box")

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        s, t = ctx.student_raw, ctx.teacher_raw
        if s is None or t is None or s.box_preds is None or t.box_preds is None or t.cls_logits is None:
            raise ValueError(f"distill term {self.label!r}: box KD needs the dense box predictions and class logits "
                             "of both heads (FCOS/RetinaNet/YOLO); a two-stage detector has none: use a feature method")
        if s.box_preds.shape != t.box_preds.shape or s.box_format != t.box_format:
            raise ValueError(f"distill term {self.label!r}: student boxes {s.box_format} {tuple(s.box_preds.shape)} and "
                             f"teacher boxes {t.box_format} {tuple(t.box_preds.shape)} differ; box KD needs the same "
                             "head layout, box format and input size")
        weights = torch.sigmoid(t.cls_logits.detach().float()).amax(dim=-1)
        loss = self._comparator(s.box_format)(s.box_preds.float(), t.box_preds.detach().float(), weights,
                                              beta=self.beta, temperature=self.temperature)
        return {"": loss}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}"
