"""The method protocol: what a distillation method declares, what it is built from, what it returns.

A method is an ``nn.Module`` subclass of :class:`DistillMethod`, registered where it is
defined with :func:`register_method`. For each KD term of a config the
:class:`~detdistill.distill.distiller.Distiller`:

1. asks the class what the term :meth:`~DistillMethod.needs` (taps, teacher outputs, ...);
2. resolves and measures those taps, and builds the method from a :class:`BuildContext`;
3. on every step runs teacher and student as the methods need, then calls
   ``method(StepContext) -> {part: unweighted loss}``;
4. logs each part as ``kd/<term>`` (part ``""``) or ``kd/<term>/<part>``, times the term's
   weight (warm-up included), and adds it to the task loss.

Everything method-specific (its checks, its trainable helpers such as connectors or mask
adapters, its use of ground truth) lives in the method. A new method is one new file; see
``docs/architecture.md`` for a worked example.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..adapters.base import DetectorAdapter
from ..config import DistillTermConfig
from ..registry import Registry
from ..structures import Batch, RawOutputs
from ..taps import FeatureTaps, TapInfo


@dataclass(frozen=True)
class Needs:
    """What one KD term needs from each step; the Distiller supplies exactly this.

    Attributes:
        student_taps: student tap names whose outputs the method reads.
        teacher_taps: teacher tap names whose outputs the method reads.
        teacher: a teacher network must be configured.
        teacher_head: the teacher's raw head outputs (otherwise it stops after its neck).
        student_head: the student's raw head outputs from ``forward_train``.
        teacher_first: the teacher runs before the student, because
            :meth:`DistillMethod.student_inputs` turns its outputs into student inputs.
    """

    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    teacher: bool = True
    teacher_head: bool = False
    student_head: bool = False
    teacher_first: bool = False


@dataclass
class BuildContext:
    """What a method is built from.

    Attributes:
        term: the config term (``pairs``, ``params``, ``connector``, ...).
        student, student_adapter: the bare student and its framework adapter.
        student_taps: this term's student taps, resolved and measured (channels, stride, kind).
        num_classes: classes of the training data.
        teacher, teacher_adapter, teacher_taps: likewise for the frozen teacher, when there is one.
        teacher_input_scale: the teacher sees the images resized by this factor, so its tap at
            stride ``s`` covers ``s / teacher_input_scale`` pixels of the student's input.
        teacher_class_names: the teacher's classes (from its checkpoint), when known.
    """

    term: DistillTermConfig
    student: nn.Module
    student_adapter: DetectorAdapter
    student_taps: dict[str, TapInfo]
    num_classes: int | None = None
    teacher: nn.Module | None = None
    teacher_adapter: DetectorAdapter | None = None
    teacher_taps: dict[str, TapInfo] = field(default_factory=dict)
    teacher_input_scale: float = 1.0
    teacher_class_names: list[str] | None = None

    @property
    def label(self) -> str:
        return self.term.label


@dataclass
class StepContext:
    """What a method sees in one step.

    Attributes:
        step: the 0-based training step.
        batch: the batch (ground truth in ``batch.targets``, boxes in input pixels).
        student: the student as the loop runs it (possibly DDP-wrapped; use ``unwrap``).
        student_taps: recorded student tap outputs (``student_taps.get(name)``).
        teacher_taps: recorded teacher tap outputs, or ``None`` without a teacher.
        student_raw: the student's raw outputs (geometry always; head outputs if needed);
            ``None`` while :meth:`DistillMethod.student_inputs` runs (the student has not run yet).
        teacher_raw: the teacher's raw outputs, or ``None`` when the teacher did not run.
        diagnostics: scalars a method reports about itself in this step, never part of the
            loss (e.g. ScaleKD's ``assistant_det_loss``); logged as ``diag/<term>/<name>``.
    """

    step: int
    batch: Batch
    student: nn.Module
    student_taps: FeatureTaps
    teacher_taps: FeatureTaps | None = None
    student_raw: RawOutputs | None = None
    teacher_raw: RawOutputs | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


class DistillMethod(nn.Module):
    """Base class of every distillation method.

    Class attributes describe the method for the registry and ``detdistill list``:
    ``name`` (the config's ``method:``), ``family`` (a one-word description such as
    ``feature``), ``default_weight`` (used when a term omits ``weight``), ``paper``, and
    ``student_requires`` / ``teacher_requires`` (a model family, e.g. ``"detr"``).

    Subclasses implement :meth:`needs`, ``__init__(ctx: BuildContext, **params)`` and
    :meth:`forward`. The term's ``params:`` are checked against :meth:`params_signature`
    before anything is built, then passed to ``__init__`` as keyword arguments.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0
    paper: ClassVar[str] = ""
    #: Model families the method needs on each side (``None``: any detector; ``"detr"``: a DETR,
    #: i.e. raw outputs with per-decoder-layer logits, boxes and queries). For ``detdistill list``
    #: and tests; the method itself checks when it is built.
    student_requires: ClassVar[str | None] = None
    teacher_requires: ClassVar[str | None] = None
    #: Why ``normalize: true`` does not suit the method (``None``: it does). The bench's loss-balance
    #: advice gives this reason in place of suggesting it.
    normalize_caveat: ClassVar[str | None] = None
    #: The keys :meth:`forward` returns (``""``: a single unnamed part). A method whose parts depend
    #: on its params sets this on the instance in ``__init__``. The Distiller checks every step's
    #: keys against it and keeps one ``normalize`` factor per part.
    part_names: tuple[str, ...] = ("",)
    #: Params whose default has changed, with the value a config that omitted them meant before.
    #: Bench records written since then carry every param (:meth:`resolved_params`), so a recorded
    #: run config that lacks one predates the change and is read with the old value: a changed
    #: default then shows as a config change instead of silently re-labelling old runs.
    legacy_param_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        """What ``term`` needs each step; raise ``ValueError`` naming the term for a bad one."""
        raise NotImplementedError

    @classmethod
    def params_signature(cls) -> Callable[..., Any]:
        """The callable whose keyword arguments are this method's ``params`` (default: ``__init__``)."""
        return cls.__init__

    @classmethod
    def reserved_params(cls) -> tuple[str, ...]:
        """Arguments of :meth:`params_signature` that the method fills itself (not user params)."""
        return ("self", "ctx", "args", "kwargs")

    @classmethod
    def check_params(cls, term: DistillTermConfig) -> None:
        """Unknown ``params`` raise, naming the term and the allowed ones."""
        sig = inspect.signature(cls.params_signature())
        allowed = [p for p in sig.parameters if p not in cls.reserved_params()]
        unknown = sorted(set(term.params) - set(allowed))
        if unknown:
            raise ValueError(f"distill term {term.label!r} ({cls.name}): unknown params {unknown}; "
                             f"allowed: {', '.join(allowed) or '(none)'}")

    @classmethod
    def resolved_params(cls, params: Mapping[str, Any], *, recorded: bool = False) -> dict[str, Any]:
        """``params`` with every omitted user param filled with its default, as plain JSON values
        (a default that is not one, or a param without a default, stays omitted).

        ``recorded=True`` reads a config written before runs recorded resolved params: a param
        listed in :attr:`legacy_param_defaults` then takes the value it had at the time.
        """
        filled = dict(params)
        for name, p in inspect.signature(cls.params_signature()).parameters.items():
            if name in filled or name in cls.reserved_params() or p.default is inspect.Parameter.empty:
                continue
            value = cls.legacy_param_defaults.get(name, p.default) if recorded else p.default
            try:
                filled[name] = json.loads(json.dumps(value))  # tuples become lists, as a YAML file holds them
            except TypeError:
                continue
        return filled

    @classmethod
    def assistant_parts(cls, term: DistillTermConfig) -> tuple[str, ...]:
        """Parts of ``term`` whose gradient reaches only the method's own modules, never the student
        (ScaleKD's assistant on the ground truth). They train like any part; reports keep them out of
        the distillation's share of the loss, which they would otherwise inflate."""
        return ()

    def student_inputs(self, ctx: StepContext) -> Mapping[str, Any]:
        """Extra training inputs for the student's forward (only with ``Needs.teacher_first``)."""
        return {}

    def frozen_student_parameters(self, step: int) -> list[nn.Parameter]:
        """Student parameters to hold still at ``step`` (their gradients are dropped before the
        optimizer step, so neither the update nor weight decay or momentum moves them)."""
        return []

    def optimizer_overrides(self) -> list[tuple[list[nn.Parameter], dict[str, Any]]]:
        """``(parameters, {"lr": ..., "weight_decay": ...})`` groups of this method's own parameters
        that train with other settings than the student (the schedule still scales their lr)."""
        return []

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        """Unweighted loss parts, keyed by :attr:`part_names`: ``{"": loss}`` for one term, or
        ``{"part": loss, ...}``."""
        raise NotImplementedError


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: add a :class:`DistillMethod` to :data:`METHODS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
        raise TypeError(f"register_method takes a DistillMethod subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to register")
    METHODS.add(cls.name, cls)
    return cls
