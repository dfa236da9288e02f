"""MSSD: multi-scale self-distillation (no teacher network); the loss is :mod:`detdistill.losses.mssd`.

Each pair is ``[FPN tap, PAN tap]`` of the *student* at one scale: the top-down FPN map
teaches the deeper bottom-up PAN map, with Gaussian foreground masks from the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ...config import DistillTermConfig
from ...losses.mssd import MSSDLoss
from ..method import BuildContext, DistillMethod, Needs, StepContext, register_method


@register_method
class MSSD(DistillMethod):
    """FPN maps teach the PAN maps of the same scale; mask adapters are the method's own parameters."""

    name = "mssd"
    family = "self"
    default_weight = 1.0
    paper = "Jia et al., MSSD (Visual Intelligence 2024): FPN maps teach PAN maps"
    # runs recorded before 2026-12-07 averaged the weighted self term over the mask's mass
    legacy_param_defaults = {"weighting_mean": "mask"}

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if not term.pairs:
            raise ValueError(f"distill term {term.label!r} (mssd) needs `pairs` of [FPN tap, PAN tap] per scale")
        return Needs(student_taps=tuple(dict.fromkeys(n for pair in term.pairs for n in pair)), teacher=False)

    @classmethod
    def params_signature(cls) -> Callable[..., Any]:
        return MSSDLoss.__init__

    @classmethod
    def reserved_params(cls) -> tuple[str, ...]:
        return (*super().reserved_params(), "channels", "num_scales", "strides")

    def __init__(self, ctx: BuildContext, **params: Any) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in ctx.term.pairs]
        # Each FPN map must match its PAN map; scales may differ in width (YOLO necks double it).
        chans = []
        for a, b in self.pairs:
            ia, ib = ctx.student_taps[a], ctx.student_taps[b]
            if ia.channels != ib.channels or ia.kind != "map" or ib.kind != "map":
                raise ValueError(f"distill term {ctx.label!r}: MSSD pair [{a}, {b}] needs two maps of equal, known "
                                 f"channels, got {ia.channels} ({ia.kind}) and {ib.channels} ({ib.kind})")
            chans.append(ia.channels)
        strides = tuple(ctx.student_taps[b].stride for _, b in self.pairs)
        self.loss_fn = MSSDLoss(**params, channels=chans, num_scales=len(self.pairs), strides=strides)
        # `mask_weight: 0` turns the mask term off (the self-only ablation): no part, so no
        # "exactly 0 for the whole run" warning for a term the config switched off on purpose
        self.part_names = ("mssd_self", "mssd_mask") if self.loss_fn.mask_weight else ("mssd_self",)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.student_raw is not None and ctx.student_raw.input_size is not None
        taps = ctx.student_taps
        return self.loss_fn([taps.get(a) for a, _ in self.pairs], [taps.get(b) for _, b in self.pairs],
                            [t.boxes for t in ctx.batch.targets], ctx.student_raw.input_size)
