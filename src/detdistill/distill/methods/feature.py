"""Feature imitation: a loss between student and teacher maps, through trainable connectors.

L2, L1 (FitNets-style baselines), PKD and Structural KD (SSIM) differ only in the loss
applied per ``[student tap, teacher tap]`` pair::

    L = sum_pairs  loss(connector(F_S), sg(F_T))

The connector (:class:`~detdistill.distill.connectors.Connector`) is a 1x1 conv when the
widths differ, then a bilinear resize to the teacher map's size (another stride or input
scale). Connectors belong to the method, so they are trained with the student and never
exported with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from ...config import DistillTermConfig
from ...losses.feature import L1FeatureLoss, L2FeatureLoss
from ...losses.pkd import PKDLoss
from ...losses.ssim import SSIMLoss
from ..connectors import Connector
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method


def connector_key(student_tap: str, teacher_tap: str) -> str:
    """The ``ModuleDict`` key of a pair's connector (dots are not allowed in keys)."""
    return f"{student_tap}|{teacher_tap}".replace(".", "_")


def map_connectors(ctx: BuildContext, method: str) -> nn.ModuleDict:
    """One :class:`Connector` per ``[student tap, teacher tap]`` pair of ``ctx.term``, keyed by
    :func:`connector_key`; a token-sequence tap on either side is an error naming it."""
    connectors = nn.ModuleDict()
    for s, t in ctx.term.pairs:
        si, ti = ctx.student_taps[s], ctx.teacher_taps[t]
        for info, role in ((si, "student"), (ti, "teacher")):
            if info.kind != "map":
                raise ValueError(f"distill term {ctx.label!r}: {role} tap {info.name!r} is a {info.kind} sequence; "
                                 f"{method} compares (N, C, H, W) maps")
        connectors[connector_key(s, t)] = Connector(si.channels, ti.channels, mode=ctx.term.connector)
    return connectors


class FeatureImitation(DistillMethod):
    """Base of the map-to-map methods: ``loss`` is the loss module, built from the term's ``params``."""

    family = "feature"
    loss: ClassVar[type[nn.Module]]

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if not term.pairs:
            raise ValueError(f"distill term {term.label!r} ({term.method}) needs `pairs` of layer names")
        return Needs(student_taps=tuple(s for s, _ in term.pairs), teacher_taps=tuple(t for _, t in term.pairs))

    @classmethod
    def params_signature(cls) -> Callable[..., Any]:
        return cls.loss.__init__

    def __init__(self, ctx: BuildContext, **params: Any) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in ctx.term.pairs]
        self.loss_fn = self.loss(**params)
        self.connectors = map_connectors(ctx, self.name)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.teacher_taps is not None
        total = None
        for s, t in self.pairs:
            target = ctx.teacher_taps.get(t).detach()
            value = self.loss_fn(self.connectors[connector_key(s, t)](ctx.student_taps.get(s), target.shape[-2:]), target)
            total = value if total is None else total + value
        return {"": total}


@register_method
class L2Imitation(FeatureImitation):
    """Mean squared error between the maps (FitNets-style hint learning)."""

    name = "l2"
    loss = L2FeatureLoss
    default_weight = 1.0
    paper = "Romero et al., FitNets (ICLR 2015): L2 feature imitation"


@register_method
class L1Imitation(FeatureImitation):
    """Mean absolute error between the maps."""

    name = "l1"
    loss = L1FeatureLoss
    default_weight = 1.0
    paper = "L1 feature imitation baseline"


@register_method
class PKD(FeatureImitation):
    """1 - Pearson correlation per channel (:mod:`detdistill.losses.pkd`)."""

    name = "pkd"
    loss = PKDLoss
    default_weight = 10.0
    paper = "Cao et al., PKD (NeurIPS 2022): Pearson-correlation feature KD"


@register_method
class StructuralKD(FeatureImitation):
    """(1 - SSIM) / 2 between min-max normalised maps (:mod:`detdistill.losses.ssim`)."""

    name = "ssim"
    loss = SSIMLoss
    default_weight = 3.0
    paper = "de Rijk et al., Structural KD (2022): 1 - SSIM feature loss"
