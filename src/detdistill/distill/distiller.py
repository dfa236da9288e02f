"""The Distiller: task loss plus weighted KD terms, with a frozen teacher.

    L = L_det + sum_k w_k(step) * L_k

Four steps, whatever the methods are (see :mod:`detdistill.distill.method`):

1. resolve and measure the taps every term declared, and build each term's method;
2. run teacher and student in the order the methods need (the teacher under ``no_grad``,
   stopping after its neck unless a method needs its head);
3. call each method on the step's context;
4. weight each returned part (``w_k`` ramps linearly from 0 over ``warmup_steps``) and add
   it to the task loss, logged as ``kd/<term>`` or ``kd/<term>/<part>``.

Methods (with their connectors and other trainable helpers) are the Distiller's own
modules: trained with the student, never exported with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import DetectorAdapter
from ..config import DistillTermConfig
from ..modules import unwrap
from ..structures import Batch, RawOutputs
from ..taps import FeatureTaps, resolve_taps
from .method import BuildContext, DistillMethod, Needs, StepContext
from .methods import METHODS


@dataclass
class Teacher:
    model: nn.Module
    adapter: DetectorAdapter
    input_scale: float = 1.0
    class_names: list[str] | None = None


def normalize_caveats(terms: Sequence[DistillTermConfig]) -> list[str]:
    """One warning per ``normalize: true`` term whose method declares that normalising does not
    suit it (``DistillMethod.normalize_caveat``), naming the term."""
    return [f"WARNING: distill term {t.label!r} sets `normalize: true`, but {caveat}"
            for t in terms if t.normalize and (caveat := METHODS.get(t.method).normalize_caveat)]


class Distiller(nn.Module):
    """Computes the student's total loss for one batch.

    Args:
        student: the student detector (bare or DDP-wrapped; taps use the bare module).
        student_adapter: the student's framework adapter.
        terms: KD terms from the config.
        teacher: the frozen teacher, or ``None`` when every term is teacher-free (MSSD).
        num_classes: classes of the training data (for methods that need it).
    """

    def __init__(self, student: nn.Module, student_adapter: DetectorAdapter, terms: list[DistillTermConfig],
                 teacher: Teacher | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("Distiller needs at least one distill term")
        self.student_adapter = student_adapter
        self.terms = {t.label: t for t in terms}
        if len(self.terms) != len(terms):
            raise ValueError(f"distill terms need distinct names; set `name` on repeated methods: {[t.label for t in terms]}")
        classes = {t.label: METHODS.get(t.method) for t in terms}
        for t in terms:
            classes[t.label].check_params(t)
        needs: dict[str, Needs] = {t.label: classes[t.label].needs(t) for t in terms}
        if teacher is None and any(n.teacher for n in needs.values()):
            raise ValueError(f"distill terms {[k for k, n in needs.items() if n.teacher]} need a teacher: "
                             "set `teacher.checkpoint` in the config")
        self.teacher = teacher
        if teacher is not None:
            teacher.model.eval()
            for p in teacher.model.parameters():
                p.requires_grad_(False)

        # 1. taps, measured once, then one method module per term
        s_names = sorted({n for x in needs.values() for n in x.student_taps})
        t_names = sorted({n for x in needs.values() for n in x.teacher_taps})
        self.s_info = resolve_taps(student_adapter, student, student_adapter.taps(student), s_names, role="student")
        self.t_info = (resolve_taps(teacher.adapter, teacher.model, teacher.adapter.taps(teacher.model), t_names,
                                    role="teacher") if teacher is not None else {})
        self.methods = nn.ModuleDict()
        for label, term in self.terms.items():
            n = needs[label]
            ctx = BuildContext(term, unwrap(student), student_adapter, {k: self.s_info[k] for k in n.student_taps},
                               num_classes, teacher.model if teacher else None, teacher.adapter if teacher else None,
                               {k: self.t_info[k] for k in n.teacher_taps}, teacher.input_scale if teacher else 1.0,
                               teacher.class_names if teacher else None)
            try:
                self.methods[self._key(label)] = classes[label](ctx, **term.params)
            except (ValueError, TypeError) as err:
                if str(err).startswith("distill term"):
                    raise  # already names the term
                # A method's own argument check (e.g. a bad `params` value) cannot know the term's name.
                kind = ValueError if isinstance(err, ValueError) else TypeError  # subclasses may take other args
                raise kind(f"distill term {label!r} ({term.method}): {err}") from err
        self.need_teacher_head = any(n.teacher_head for n in needs.values())
        self.need_student_head = any(n.student_head for n in needs.values())
        self.teacher_first = any(n.teacher_first for n in needs.values())
        self.run_teacher = teacher is not None and (bool(self.t_info) or self.need_teacher_head)
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        self._bound_student: int | None = None
        self.last_diagnostics: dict[str, float] = {}  # the last step's ``diag/<term>/<name>`` values
        # `normalize: true` terms: one factor per part, task loss / part at the part's first non-zero
        # step, kept (and checkpointed) after. Per part, so that a part starting late (ScaleKD's CSA
        # after `csa_start`) is not scaled by a factor measured on another one.
        keys = [(label, part) for label, t in self.terms.items() if t.normalize for part in self.method(label).part_names]
        self._norm_slots = {key: i for i, key in enumerate(keys)}
        if self._norm_slots:
            self.register_buffer("kd_scales", torch.full((len(self._norm_slots),), float("nan")))

    @staticmethod
    def _key(label: str) -> str:
        return label.replace(".", "_")  # ModuleDict keys cannot hold dots

    def method(self, label: str) -> DistillMethod:
        """The built method of the term named ``label``."""
        return self.methods[self._key(label)]

    def frozen_parameters(self, step: int) -> list[nn.Parameter]:
        """Student parameters some method holds still at ``step`` (see ``DistillMethod.frozen_student_parameters``)."""
        return [p for m in self.methods.values() for p in m.frozen_student_parameters(step)]

    def optimizer_overrides(self) -> list[tuple[list[nn.Parameter], dict[str, object]]]:
        """Parameter groups of the methods that train with their own optimiser settings."""
        return [g for m in self.methods.values() for g in m.optimizer_overrides()]

    def weight(self, term: DistillTermConfig, step: int) -> float:
        """The term's weight at ``step``: its ``weight`` (or the method's default), ramped over ``warmup_steps``."""
        w = term.weight if term.weight is not None else METHODS.get(term.method).default_weight
        if term.warmup_steps and step < term.warmup_steps:
            return w * step / term.warmup_steps
        return w

    def _scales(self, label: str, task: Tensor, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The fixed factors of a ``normalize`` term's parts. Each is set at the first step where the
        part is non-zero on some rank, to task loss / |part| (averaged over the ranks where it is),
        so every rank scales alike; a part not started yet gets 0 (it is 0 anyway)."""
        slots = [self._norm_slots[(label, part)] for part in parts]
        current = self.kd_scales[slots]
        unset = torch.isnan(current)
        if bool(unset.any()):  # the same on every rank: the factors are set on all of them at once
            values = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
            fresh = unset & (values != 0)
            ratio = torch.where(fresh, task.float() / values.abs().clamp_min(1e-12), torch.zeros_like(values))
            stats = torch.cat([ratio, fresh.float()])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            total, count = stats.chunk(2)
            measured = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
            self.kd_scales[slots] = torch.where(unset, measured, current)
            current = self.kd_scales[slots]
        return {part: torch.nan_to_num(current[i], nan=0.0) for i, part in enumerate(parts)}

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

    def teacher_forward(self, batch: Batch) -> RawOutputs:
        """The frozen teacher's features (and head outputs if a method needs them) for ``batch``,
        at the teacher's input scale, under ``no_grad``."""
        assert self.teacher is not None
        images = batch.images
        if self.teacher.input_scale != 1.0:
            images = [F.interpolate(im[None], scale_factor=self.teacher.input_scale, mode="bilinear",
                                    align_corners=False)[0] for im in images]
        with torch.no_grad():
            return self.teacher.adapter.forward_features(self.teacher.model, images, need_head=self.need_teacher_head)

    def forward(self, student: nn.Module, batch: Batch, step: int) -> dict[str, Tensor]:
        """Loss terms for one batch: the task terms, then ``kd/<name>`` (already weighted)."""
        s_taps, t_taps = self._ensure_taps(student)
        for taps in (s_taps, t_taps):
            if taps is not None:  # record only during this step, never in eval forwards between steps
                taps.clear()
                taps.enabled = True
        try:
            # 2. teacher and student, in the order the methods need
            ctx = StepContext(step, batch, student, s_taps, t_taps)
            extra: dict[str, object] = {}
            if self.run_teacher and self.teacher_first:
                ctx.teacher_raw = self.teacher_forward(batch)
                for m in self.methods.values():
                    extra.update(m.student_inputs(ctx))
            losses, ctx.student_raw = self.student_adapter.forward_train(
                student, batch, need_raw=self.need_student_head, extra_inputs=extra or None)
            if self.run_teacher and not self.teacher_first:
                ctx.teacher_raw = self.teacher_forward(batch)
            # 3. each method, 4. weighted into the total
            task = sum(v.detach() for v in losses.values())
            self.last_diagnostics = {}
            for label, term in self.terms.items():
                w = self.weight(term, step)
                method = self.methods[self._key(label)]
                ctx.diagnostics = {}
                parts = method(ctx)
                self.last_diagnostics.update({f"diag/{label}/{k}": float(v) for k, v in ctx.diagnostics.items()})
                if set(parts) != set(method.part_names):
                    raise RuntimeError(f"distill term {label!r} ({term.method}) returned parts {sorted(parts)}, "
                                       f"but declares part_names {sorted(method.part_names)}")
                scales = self._scales(label, task, parts) if term.normalize else {}
                for part, value in parts.items():
                    factor = w * scales[part] if term.normalize else w
                    losses[f"kd/{label}/{part}" if part else f"kd/{label}"] = factor * value
            return losses
        finally:
            for taps in (s_taps, t_taps):
                if taps is not None:
                    taps.clear()
                    taps.enabled = False
