"""ScaleKD (Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023).

    L = L_det + alpha * L_feat + beta * L_cls + gamma * L_bbox + csa_weight * L_csa

- **SDF** (``L_feat``): the last backbone stage of teacher and student, the student's through
  a 1x1 dimension adapter to the teacher's width, goes through one weight-shared
  :class:`~detdistill.distill.scalekd_modules.ScaleDecoupledFeatures` (three dilations,
  MLP-flattened, concatenated); ``L_feat`` is the MSE between the two embeddings.
- **CSA**: at every level the student's head reads, a
  :class:`~detdistill.distill.scalekd_modules.CrossScaleAssistant` refines the student map
  with multi-scale cross-attention on the teacher's map of the same effective stride (a
  finer teacher map, e.g. P7 under a 2x teacher, is average-pooled to the student's size). The
  refined maps go through **the student's own head** (``adapter.head``), supervised by the
  ground truth (``L_csa`` = ``adapter.head_loss``), and the student's class and box outputs
  are distilled toward the assistant's (``L_cls``: sigmoid KL; ``L_bbox``: smooth L1 weighted
  by the assistant's foreground confidence, or on YOLOv8's DFL bins the KL over each side's
  distribution, as the ``box`` method compares them) instead of toward the teacher's raw outputs.

Choices where the paper is open (``docs/methods.md`` has the reasons):

- The teacher side of SDF is the target: computed without gradient, through the same SDF
  module (``sdf_grad="student"`` trains the module through the student side only;
  ``"none"`` keeps it a fixed random multi-scale projection).
- The CSA reads detached student maps (``detach_student_features``) and its pass through the
  student's head uses the head's weights frozen (:func:`~detdistill.modules.frozen_pass`):
  its GT loss trains the assistant only. The head judges the assistant's maps, as the paper's
  shared head does, but is trained by the student's own loss and the distillation alone;
  this also keeps DDP's one-use-per-parameter rule and the BatchNorm statistics intact.
- The student's outputs are distilled toward *detached* CSA outputs.
- Two-stage students (Faster R-CNN) distil the RPN's objectness and box deltas (anchors are
  shared by both passes; the region head samples different proposals in each).
- Schedule: the CSA terms are 0 before ``csa_start`` (the student warms up first), and the
  student backbone is held still for ``freeze_backbone_steps``.
- The assistant trains with its own optimiser, the paper's Adam (lr 3e-4, wd 1e-4), whatever
  the student's (``csa_optimizer``; null puts it in the run's optimiser with ``csa_lr``). Under an
  SGD student an Adam lr in SGD barely moves it. Assistant and student step on the same
  backward, so the student is distilled toward the assistant of the previous step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import DistillTermConfig
from ...engine.optim import OPTIMIZER_KINDS
from ...losses.feature import l2_feature_loss
from ...losses.kl import kl_logit_loss
from ...modules import frozen_pass, unwrap
from ...structures import RawOutputs
from ..connectors import Connector
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method
from ..scalekd_modules import CrossScaleAssistant, ScaleDecoupledFeatures
from .box import box_comparator

_SDF_TAPS = ("backbone.layer4", "backbone.layer4")


def _sdf_taps(term: DistillTermConfig) -> tuple[str, str]:
    taps = term.params.get("sdf_taps", _SDF_TAPS)
    if not (isinstance(taps, (list, tuple)) and len(taps) == 2 and all(isinstance(t, str) for t in taps)):
        raise ValueError(f"distill term {term.label!r} (scalekd): sdf_taps is [student tap, teacher tap], got {taps!r}")
    return taps[0], taps[1]


@register_method
class ScaleKD(DistillMethod):
    """Scale-decoupled feature distillation plus the cross-scale assistant (see the module docstring).

    ``pairs`` are the CSA levels ``[student tap, teacher tap]``: every level the student's
    head reads, finest first, each with the teacher map of the same effective stride (at a
    2x teacher input, the teacher's P4 pairs with the student's P3).
    """

    name = "scalekd"
    family = "scale"
    default_weight = 1.0  # alpha, beta, gamma and csa_weight weigh the parts
    paper = "Zhu et al., ScaleKD (CVPR 2023): scale-decoupled features + cross-scale assistant"
    normalize_caveat = ("normalising does not suit `scalekd`: its factor (thousands at alpha 0.01) is also the SGD "
                        "step of the SDF's own branches, and the normalised SDF diverged on aerial-cars (docs/methods.md)")

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        use_sdf, use_csa = term.params.get("use_sdf", True), term.params.get("use_csa", True)
        if not (use_sdf or use_csa):
            raise ValueError(f"distill term {term.label!r} (scalekd): use_sdf and use_csa are both off")
        if use_csa and not term.pairs:
            raise ValueError(f"distill term {term.label!r} (scalekd): the CSA needs `pairs`, one [student tap, teacher "
                             "tap] per level the student's head reads (e.g. neck.p3..neck.p7)")
        s_taps = [s for s, _ in term.pairs] if use_csa else []
        t_taps = [t for _, t in term.pairs] if use_csa else []
        if use_sdf:
            s, t = _sdf_taps(term)
            s_taps.append(s)
            t_taps.append(t)
        return Needs(student_taps=tuple(dict.fromkeys(s_taps)), teacher_taps=tuple(dict.fromkeys(t_taps)),
                     student_head=use_csa)

    @classmethod
    def assistant_parts(cls, term: DistillTermConfig) -> tuple[str, ...]:
        # the CSA's ground-truth loss reads detached student maps through the frozen head
        detached = term.params.get("detach_student_features", True)
        return ("csa",) if term.params.get("use_csa", True) and detached else ()

    def __init__(self, ctx: BuildContext, alpha: float = 0.01, beta: float = 0.2, gamma: float = 0.05,
                 csa_weight: float = 1.0, use_sdf: bool = True, use_csa: bool = True,
                 sdf_taps: Sequence[str] = _SDF_TAPS, sdf_hidden: int = 64, sdf_embed_dim: int = 256, sdf_grid: int = 4,
                 sdf_grad: str = "student", csa_rates: Sequence[int] = (1, 2, 4, 8),
                 csa_sources: Sequence[str] = ("s", "t", "s"), detach_student_features: bool = True,
                 temperature: float = 1.0, csa_start: int = 0, freeze_backbone_steps: int = 0,
                 csa_optimizer: str | None = "adam", csa_lr: float | None = 3e-4,
                 csa_weight_decay: float | None = 1e-4) -> None:
        super().__init__()
        if sdf_grad not in ("student", "none"):
            raise ValueError(f"distill term {ctx.label!r} (scalekd): sdf_grad is 'student' or 'none', got {sdf_grad!r}")
        if csa_optimizer not in (None, *OPTIMIZER_KINDS):
            raise ValueError(f"distill term {ctx.label!r} (scalekd): csa_optimizer is one of {sorted(OPTIMIZER_KINDS)} "
                             f"or null (the run's optimizer), got {csa_optimizer!r}")
        self.label = ctx.label
        self.alpha, self.beta, self.gamma, self.csa_weight = alpha, beta, gamma, csa_weight
        self.use_sdf, self.use_csa = use_sdf, use_csa
        self.part_names = ("feat",) * use_sdf + ("cls", "bbox", "csa") * use_csa
        self.temperature = temperature
        self.csa_start, self.freeze_backbone_steps = csa_start, freeze_backbone_steps
        self.detach_student_features = detach_student_features
        self.csa_optimizer, self.csa_lr, self.csa_weight_decay = csa_optimizer, csa_lr, csa_weight_decay
        self._adapter = ctx.student_adapter
        self._backbone = ctx.student_adapter.backbone_parameters(ctx.student) if freeze_backbone_steps else []
        if use_sdf:
            self.sdf_s, self.sdf_t = sdf_taps
            cs, ct = ctx.student_taps[self.sdf_s].channels, ctx.teacher_taps[self.sdf_t].channels
            self.sdf_adapter = Connector(cs, ct)  # student width -> teacher width; the teacher's map is the target
            self.sdf = ScaleDecoupledFeatures(ct, hidden=sdf_hidden, embed_dim=sdf_embed_dim, grid=sdf_grid)
            if sdf_grad == "none":
                self.sdf.requires_grad_(False)
        if use_csa:
            self.pairs = [tuple(p) for p in ctx.term.pairs]
            for s, t in self.pairs:
                si, ti = ctx.student_taps[s], ctx.teacher_taps[t]
                effective = ti.stride / ctx.teacher_input_scale  # student pixels per teacher cell
                if si.kind != "map" or ti.kind != "map" or effective > si.stride + 1e-6:
                    raise ValueError(
                        f"distill term {ctx.label!r} (scalekd): CSA pair [{s}, {t}] is misaligned: the student map has "
                        f"stride {si.stride}, the teacher map stride {ti.stride} at input scale {ctx.teacher_input_scale} "
                        f"(= {effective:g} student pixels), coarser than the student's; pair each student level with "
                        "the teacher level of the same effective stride (or a finer one, which is average-pooled)")
            self.csa = CrossScaleAssistant([ctx.student_taps[s].channels for s, _ in self.pairs],
                                           [ctx.teacher_taps[t].channels for _, t in self.pairs],
                                           rates=csa_rates, sources=tuple(csa_sources))  # type: ignore[arg-type]

    # ---- schedule and optimiser -------------------------------------------------
    def frozen_student_parameters(self, step: int) -> list[nn.Parameter]:
        return list(self._backbone) if step < self.freeze_backbone_steps else []

    def optimizer_overrides(self) -> list[tuple[list[nn.Parameter], dict[str, Any]]]:
        settings = {k: v for k, v in (("optimizer", self.csa_optimizer), ("lr", self.csa_lr),
                                      ("weight_decay", self.csa_weight_decay)) if v is not None}
        return [(list(self.csa.parameters()), settings)] if self.use_csa and settings else []

    # ---- the loss -----------------------------------------------------------------
    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.teacher_taps is not None
        parts: dict[str, Tensor] = {}
        if self.use_sdf:
            target_map = ctx.teacher_taps.get(self.sdf_t).detach()
            with torch.no_grad():
                target = self.sdf(target_map)
            student_map = ctx.student_taps.get(self.sdf_s)
            pred = self.sdf(self.sdf_adapter(student_map, student_map.shape[-2:]))
            parts["feat"] = self.alpha * l2_feature_loss(pred, target)
        if self.use_csa:
            parts.update(self._csa_parts(ctx))
        return parts

    def _csa_parts(self, ctx: StepContext) -> dict[str, Tensor]:
        assert ctx.teacher_taps is not None and ctx.student_raw is not None
        s_maps = [ctx.student_taps.get(s) for s, _ in self.pairs]
        if ctx.step < self.csa_start:  # the student warms up first: the assistant is not trained yet
            zero = s_maps[0].new_zeros(())
            return {"cls": zero, "bbox": zero, "csa": zero}
        t_maps = []
        for (s, t), fs in zip(self.pairs, s_maps):
            ft = ctx.teacher_taps.get(t).detach()
            if ft.shape[-2:] != fs.shape[-2:]:  # a finer teacher level, or padding that differs by a cell
                ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
            t_maps.append(ft)
        inputs = [m.detach() for m in s_maps] if self.detach_student_features else s_maps
        refined = self.csa(inputs, t_maps)
        student, batch = unwrap(ctx.student), ctx.batch
        # The shared head judges the assistant but is not trained by it (module docstring).
        with frozen_pass(student):
            assistant = self._adapter.head(student, refined, ctx.student_raw, batch)
            csa_loss = sum(self._adapter.head_loss(student, assistant, batch).values())
        # Read against the student's own detection loss: an assistant that detects no better than
        # the student has nothing to teach it (the bench's loss balance says so).
        ctx.diagnostics["assistant_det_loss"] = float(csa_loss.detach())
        ctx.diagnostics.update(csa_residual_stats(s_maps, refined))
        mine = ctx.student_raw  # the student's own outputs, from its training forward
        if mine.cls_logits is None:  # two-stage: the RPN is the dense part both passes share
            s_logits, s_boxes = _rpn(mine)
            a_logits, a_boxes = _rpn(assistant)
            box_format = "retinanet_deltas"  # the RPN regresses anchor deltas
        else:
            s_logits, s_boxes, a_logits, a_boxes = mine.cls_logits, mine.box_preds, assistant.cls_logits, assistant.box_preds
            box_format = mine.box_format
        # Boxes are compared as box KD compares them: smooth L1 on regressed values, KL on YOLOv8's DFL
        # bins (a smooth L1 on bin logits pulls on values that are not distances). Looked up here, not at
        # build: a blank-image probe cannot run a two-stage head, and it is one dict lookup a step.
        compare_boxes = box_comparator(box_format, self.label, "scalekd")
        if s_logits.shape != a_logits.shape:
            raise ValueError(f"distill term {self.label!r} (scalekd): the CSA pairs must be every level the student's "
                             f"head reads: head outputs {tuple(s_logits.shape)} vs {tuple(a_logits.shape)}")
        a_logits, a_boxes = a_logits.detach(), a_boxes.detach()
        confidence = torch.sigmoid(a_logits).amax(dim=-1)
        return {"cls": self.beta * kl_logit_loss(s_logits, a_logits, temperature=self.temperature, mode="sigmoid"),
                "bbox": self.gamma * compare_boxes(s_boxes, a_boxes, confidence, beta=1.0, temperature=1.0),
                "csa": self.csa_weight * csa_loss}


@torch.no_grad()
def csa_residual_stats(student: Sequence[Tensor], refined: Sequence[Tensor]) -> dict[str, float]:
    """How much the assistant changes the student's maps, averaged over levels.

    With ``R = refined - F_S`` per level ``(N, C, H, W)``:

    - ``assistant_residual_ratio`` = ``||R|| / ||F_S||``: near 0, the assistant's maps are the
      student's and its outputs (the distillation targets) are the student's own;
    - ``assistant_residual_spatial`` = ``||R - mean_HW(R)||^2 / ||R||^2``: the share of the change that
      varies over positions. Near 0, the change is one vector per channel, which cannot single
      out small objects and which the head's GroupNorm largely removes.
    """
    ratios, spatial = [], []
    for fs, fr in zip(student, refined):
        r = (fr - fs).float()
        ratios.append(float(r.norm() / fs.float().norm().clamp_min(1e-12)))
        varying = r - r.mean(dim=(-2, -1), keepdim=True)
        spatial.append(float(varying.pow(2).sum() / r.pow(2).sum().clamp_min(1e-24)))
    return {"assistant_residual_ratio": sum(ratios) / len(ratios), "assistant_residual_spatial": sum(spatial) / len(spatial)}


def _rpn(raw: RawOutputs) -> tuple[Tensor, Tensor]:
    if raw.two_stage is None:
        raise ValueError("scalekd: the student's head gives neither dense logits nor RPN outputs")
    return raw.two_stage.rpn_objectness.unsqueeze(-1), raw.two_stage.rpn_deltas
