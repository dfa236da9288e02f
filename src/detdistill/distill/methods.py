"""The registry of distillation methods: which loss, what it consumes, its default weight.

A method's *kind* tells the Distiller what to feed its loss module:

- ``feature``: pairs of (student tap, teacher tap) maps, through a connector;
- ``logit``: the dense heads' class logits of student and teacher;
- ``self``: pairs of two *student* taps plus ground truth (MSSD; no teacher).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    loss: type[nn.Module]
    kind: str  # "feature" | "logit" | "self"
    default_weight: float
    paper: str

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "self"

    def build(self, params: dict[str, Any], **extra: Any) -> nn.Module:
        """Instantiate the loss; unknown ``params`` raise naming the allowed ones."""
        sig = inspect.signature(self.loss.__init__)
        allowed = [p for p in sig.parameters if p not in ("self", "args", "kwargs") and p not in extra]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown params {unknown}; allowed: {', '.join(allowed) or '(none)'}")
        return self.loss(**params, **extra)


METHODS: Registry[MethodSpec] = Registry("distillation method")


def _register_builtin() -> None:
    from ..losses.feature import L1FeatureLoss, L2FeatureLoss
    from ..losses.kl import KLLogitLoss
    from ..losses.mssd import MSSDLoss
    from ..losses.pkd import PKDLoss
    from ..losses.ssim import SSIMLoss

    for spec in (
        MethodSpec("l2", L2FeatureLoss, "feature", 1.0, "Romero et al., FitNets (ICLR 2015): L2 feature imitation"),
        MethodSpec("l1", L1FeatureLoss, "feature", 1.0, "L1 feature imitation baseline"),
        MethodSpec("pkd", PKDLoss, "feature", 10.0, "Cao et al., PKD (NeurIPS 2022): Pearson-correlation feature KD"),
        MethodSpec("ssim", SSIMLoss, "feature", 3.0, "de Rijk et al., Structural KD (2022): 1 - SSIM feature loss"),
        MethodSpec("kl", KLLogitLoss, "logit", 1.0, "Hinton et al. (2015) KD with temperature, on dense-head class logits"),
        MethodSpec("mssd", MSSDLoss, "self", 1.0, "Jia et al., MSSD (Visual Intelligence 2024): FPN maps teach PAN maps"),
    ):
        METHODS.add(spec.name, spec)


_register_builtin()
