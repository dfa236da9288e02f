"""Inheriting strategy: start the student's neck and head from the teacher's.

Detection KD papers that distil between detectors with the same neck and head (ICD, Kang et
al. 2021; FGD, Yang et al. 2022; PKD, Cao et al. 2022) initialise the student's neck and head
with the teacher's trained parameters and only its backbone from scratch (or ImageNet). It
pairs naturally with feature imitation on the neck: once the student's neck maps resemble the
teacher's, the inherited head already decodes them.

"Neck and head" is every entry of the student's ``state_dict`` outside its backbone, as the
framework adapter defines the backbone (:meth:`DetectorAdapter.backbone_parameters`), so the
same option works for any adapter. Every such entry must exist in the teacher with the same
shape (the same neck/head design, channel widths and class count); otherwise nothing is
copied and the error names the entries that do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import DetectorAdapter
from ..modules import unwrap


@dataclass(frozen=True)
class Inherited:
    """What :func:`inherit_neck_and_head` copied."""

    keys: list[str]  # state-dict entries copied (parameters and buffers)
    parameters: int  # number of parameter values copied
    backbone_prefixes: list[str]  # the student modules left as they were

    def summary(self) -> str:
        return (f"inherited the teacher's neck and head: {len(self.keys)} tensors, {self.parameters:,} parameters "
                f"(backbone {', '.join(self.backbone_prefixes)} kept from the student's own init)")


def backbone_prefixes(model: nn.Module, adapter: DetectorAdapter) -> list[str]:
    """Module paths of ``model`` that make up its backbone: the largest modules whose parameters
    are all backbone parameters (e.g. ``backbone.body``; ``model.0`` ... ``model.9`` for YOLO)."""
    bare = unwrap(model)
    backbone = {id(p) for p in adapter.backbone_parameters(bare)}
    if not backbone:
        raise ValueError(f"the {adapter.name} adapter names no backbone parameters for this model, so its neck and "
                         "head cannot be told apart from its backbone")
    inside: set[str] = set()
    for name, module in bare.named_modules():
        params = list(module.parameters())
        if name and params and all(id(p) in backbone for p in params):
            inside.add(name)
    # keep the outermost: a module whose parent is also all-backbone is covered by the parent
    return sorted(n for n in inside if not any(n.startswith(o + ".") for o in inside))


def _in_any(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


@torch.no_grad()
def inherit_neck_and_head(student: nn.Module, teacher: nn.Module, adapter: DetectorAdapter) -> Inherited:
    """Copy every state entry of ``student`` outside its backbone from ``teacher``, in place.

    Draws no random numbers (a seed's backbone init and crops stay those of the run without it).
    Raises ``ValueError`` naming the entries the teacher lacks or holds in another shape, before
    anything is copied.
    """
    bare_s, bare_t = unwrap(student), unwrap(teacher)
    prefixes = backbone_prefixes(bare_s, adapter)
    own = bare_s.state_dict()
    theirs = bare_t.state_dict()
    keys = [k for k in own if not _in_any(k, prefixes)]
    missing = [k for k in keys if k not in theirs]
    shaped = [f"{k}: student {tuple(own[k].shape)}, teacher {tuple(theirs[k].shape)}"
              for k in keys if k in theirs and theirs[k].shape != own[k].shape]
    if missing or shaped:
        parts = [f"cannot inherit the teacher's neck and head ({len(missing) + len(shaped)} of {len(keys)} "
                 "entries do not fit); the inheriting strategy needs the same neck and head design, widths and "
                 "classes in both (e.g. FCOS R34 -> R18 with the same fpn_channels):"]
        if shaped:
            parts.append("  other shape: " + "; ".join(shaped[:6]) + (f"; ... ({len(shaped) - 6} more)" if len(shaped) > 6 else ""))
        if missing:
            parts.append("  not in the teacher: " + ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more)" if len(missing) > 6 else ""))
        raise ValueError("\n".join(parts))
    if not keys:
        raise ValueError("the student has no state outside its backbone: nothing to inherit")
    for k in keys:
        own[k].copy_(theirs[k].to(own[k].device, own[k].dtype))
    params = dict(bare_s.named_parameters())
    return Inherited(keys, sum(params[k].numel() for k in keys if k in params), prefixes)
