"""The built-in distillation methods; each registers itself in :data:`METHODS` where it is defined.

Importing this package registers them all. A method defined elsewhere (a user's file, a
test) registers the same way, with :func:`~detdistill.distill.method.register_method`.
"""

from __future__ import annotations

from ..method import METHODS, DistillMethod, register_method
from . import box, decoupled_feature, detr, detr_query, feature, logits, mssd, scalekd  # noqa: F401  (registration on import)

__all__ = ["METHODS", "DistillMethod", "register_method"]
