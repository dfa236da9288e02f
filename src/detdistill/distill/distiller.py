"""The Distiller: task loss plus weighted KD terms, with a frozen teacher.

    L = L_det + sum_k w_k(step) * L_k

Each term is logged under its own name (``kd/<name>``); ``w_k`` ramps linearly from 0
over the term's ``warmup_steps``. The teacher runs in eval mode under ``no_grad`` and
stops after its neck unless a logit term needs its head. Connectors and method modules
(e.g. MSSD's adaptation layers) are the Distiller's own parameters: trained with the
student, never exported with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import DetectorAdapter, probe_tap_shapes, unwrap
from ..config import DistillTermConfig
from ..structures import Batch, TapInfo
from .connectors import Connector
from .methods import METHODS, MethodSpec
from .taps import FeatureTaps, resolve_taps


@dataclass
class Teacher:
    model: nn.Module
    adapter: DetectorAdapter
    input_scale: float = 1.0
    class_names: list[str] | None = None


@torch.no_grad()
def _size_raw_taps(model: nn.Module, adapter: DetectorAdapter, infos: dict[str, TapInfo]) -> dict[str, TapInfo]:
    """Fill in channels/stride of raw module-path taps (resolved with 0, 0) by one dry probe;
    taps that the probe does not reach stay unknown."""
    unknown = {k: (v.module, v.key) for k, v in infos.items() if v.channels == 0}
    if not unknown:
        return infos
    shapes = probe_tap_shapes(adapter, model, unknown)
    return {k: (TapInfo(v.name, v.module, v.key, *shapes[k]) if k in shapes else v) for k, v in infos.items()}


class Distiller(nn.Module):
    """Computes the student's total loss for one batch.

    Args:
        student: the student detector (bare or DDP-wrapped; taps use the bare module).
        student_adapter: the student's framework adapter.
        terms: KD terms from the config.
        teacher: the frozen teacher, or ``None`` when every term is teacher-free (MSSD).
    """

    def __init__(self, student: nn.Module, student_adapter: DetectorAdapter, terms: list[DistillTermConfig],
                 teacher: Teacher | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("Distiller needs at least one distill term")
        self.student_adapter = student_adapter
        self.terms = terms
        self.specs: dict[str, MethodSpec] = {t.label: METHODS.get(t.method) for t in terms}
        if teacher is None and any(s.needs_teacher for s in self.specs.values()):
            need = [k for k, s in self.specs.items() if s.needs_teacher]
            raise ValueError(f"distill terms {need} need a teacher: set `teacher.checkpoint` in the config")
        self.teacher = teacher
        if teacher is not None:
            teacher.model.eval()
            for p in teacher.model.parameters():
                p.requires_grad_(False)

        s_avail = student_adapter.taps(student)
        t_avail = teacher.adapter.taps(teacher.model) if teacher is not None else {}
        s_names, t_names = [], []
        for t in terms:
            spec = self.specs[t.label]
            if spec.kind in ("feature", "self") and not t.pairs:
                raise ValueError(f"distill term {t.label!r} ({t.method}) needs `pairs` of layer names")
            if spec.kind == "logit" and t.pairs:
                raise ValueError(f"distill term {t.label!r} ({t.method}) works on head logits; remove `pairs`")
            for s, tt in t.pairs:
                s_names.append(s)
                (s_names if spec.kind == "self" else t_names).append(tt)
        self.s_info = _size_raw_taps(student, student_adapter,
                                     resolve_taps(student, s_avail, sorted(set(s_names)), role="student"))
        self.t_info = _size_raw_taps(teacher.model, teacher.adapter,
                                     resolve_taps(teacher.model, t_avail, sorted(set(t_names)), role="teacher")) if teacher else {}
        self.need_teacher_head = any(s.kind == "logit" for s in self.specs.values())
        self.need_student_raw = self.need_teacher_head

        self.connectors = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        for t in terms:
            spec = self.specs[t.label]
            if spec.kind == "self":
                # Each FPN map must match its PAN map; scales may differ in width (YOLO necks double it).
                chans = []
                for a, b in t.pairs:
                    ca, cb = self.s_info[a].channels, self.s_info[b].channels
                    if ca != cb or ca == 0:
                        raise ValueError(f"term {t.label!r}: MSSD pair [{a}, {b}] needs equal, known channels, got {ca} and {cb}")
                    chans.append(ca)
                strides = [self.s_info[b].stride for _, b in t.pairs]
                self.losses[t.label] = spec.build(t.params, channels=chans, num_scales=len(t.pairs), strides=tuple(strides))
                continue
            self.losses[t.label] = spec.build(t.params)
            for s, tt in t.pairs:
                cs, ct = self.s_info[s].channels, self.t_info[tt].channels
                if cs == 0 or ct == 0:
                    raise ValueError(f"term {t.label!r}: cannot tell the channels of {s!r} / {tt!r}; tap a feature-map layer")
                self.connectors[self._key(t.label, s, tt)] = Connector(cs, ct, mode=t.connector)
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        self._bound_student: int | None = None

    @staticmethod
    def _key(label: str, s: str, t: str) -> str:
        return f"{label}|{s}|{t}".replace(".", "_")

    def _ensure_taps(self, student: nn.Module) -> tuple[FeatureTaps, FeatureTaps | None]:
        # Hooks are attached lazily and once: attaching per step would cost, and the same
        # FeatureTaps object is cleared after every step instead.
        if self._student_taps is None or self._bound_student != id(unwrap(student)):
            if self._student_taps is not None:
                self._student_taps.remove()
            self._student_taps = FeatureTaps(student, self.s_info)
            self._bound_student = id(unwrap(student))
        if self._teacher_taps is None and self.teacher is not None and self.t_info:
            self._teacher_taps = FeatureTaps(self.teacher.model, self.t_info)
        return self._student_taps, self._teacher_taps

    def remove_hooks(self) -> None:
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self._student_taps = self._teacher_taps = None

    def weight(self, term: DistillTermConfig, step: int) -> float:
        if term.warmup_steps and step < term.warmup_steps:
            return term.weight * step / term.warmup_steps
        return term.weight

    def forward(self, student: nn.Module, batch: Batch, step: int) -> dict[str, Tensor]:
        """Loss terms for one batch: the task terms, then ``kd/<name>`` (already weighted)."""
        s_taps, t_taps = self._ensure_taps(student)
        for taps in (s_taps, t_taps):
            if taps is not None:  # record only during this step, never in eval forwards between steps
                taps.clear()
                taps.enabled = True
        try:
            losses, s_raw = self.student_adapter.forward_train(student, batch, need_raw=self.need_student_raw)
            t_raw = None
            if self.teacher is not None:
                images = batch.images
                if self.teacher.input_scale != 1.0:
                    images = [F.interpolate(im[None], scale_factor=self.teacher.input_scale, mode="bilinear",
                                            align_corners=False)[0] for im in images]
                with torch.no_grad():
                    t_raw = self.teacher.adapter.forward_features(self.teacher.model, images, need_head=self.need_teacher_head)
            for term in self.terms:
                spec = self.specs[term.label]
                loss_fn = self.losses[term.label]
                if spec.kind == "feature":
                    value = sum(loss_fn(self.connectors[self._key(term.label, s, t)](s_taps.get(s), t_taps.get(t).shape[-2:]),
                                        t_taps.get(t).detach()) for s, t in term.pairs)
                elif spec.kind == "logit":
                    assert t_raw is not None
                    if s_raw.cls_logits is None or t_raw.cls_logits is None:
                        raise ValueError(f"term {term.label!r}: both detectors need dense class logits")
                    if s_raw.cls_logits.shape != t_raw.cls_logits.shape:
                        raise ValueError(f"term {term.label!r}: student logits {tuple(s_raw.cls_logits.shape)} and teacher "
                                         f"logits {tuple(t_raw.cls_logits.shape)} differ; logit KD needs the same head layout "
                                         "(anchors per location, levels, classes) and input size")
                    value = loss_fn(s_raw.cls_logits, t_raw.cls_logits.detach())
                else:  # self-distillation: pairs are (teacher-side student tap, student-side tap)
                    first = s_taps.get(term.pairs[0][1])
                    stride = self.s_info[term.pairs[0][1]].stride
                    image_size = (first.shape[-2] * stride, first.shape[-1] * stride)
                    parts = loss_fn([s_taps.get(a) for a, _ in term.pairs], [s_taps.get(b) for _, b in term.pairs],
                                    [t.boxes for t in batch.targets], image_size)
                    for k, v in parts.items():
                        losses[f"kd/{term.label}/{k}"] = self.weight(term, step) * v
                    continue
                losses[f"kd/{term.label}"] = self.weight(term, step) * value
            return losses
        finally:
            for taps in (s_taps, t_taps):
                if taps is not None:
                    taps.clear()
                    taps.enabled = False
