"""Optimizers and learning-rate schedules (linear warmup, then cosine / step / constant)."""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig


OPTIMIZER_KINDS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class OptimizerChain(torch.optim.Optimizer):
    """Optimizers of different kinds, stepped, zeroed, scheduled and checkpointed as one.

    A KD method's own modules may train with another optimizer than the student (ScaleKD's
    assistant uses Adam under an SGD student). Its :attr:`param_groups` are the inner
    optimizers' own group dicts, so one LR scheduler, gradient clipping and ``GradScaler``
    over the chain reach every group. ``state_dict()`` is ``{"optimizers": [...]}``, one entry
    per inner optimizer in order.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if len(optimizers) < 2:
            raise ValueError("an OptimizerChain chains at least two optimizers")
        self.optimizers = list(optimizers)
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share_groups()

    def _share_groups(self) -> None:
        # Optimizer.load_state_dict replaces an optimizer's group dicts: take the new ones.
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = ChainMap(*(o.state for o in self.optimizers))  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("OptimizerChain.step takes no closure")
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        kinds = [type(o).__name__ for o in self.optimizers]
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            held = f"{len(saved)} optimizers" if isinstance(saved, list) else "one optimizer"
            raise ValueError(f"the checkpoint's optimizer state holds {held}, this run trains with "
                             f"{len(kinds)} ({', '.join(kinds)}): it was written by another configuration")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
        self._share_groups()


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter],
                    overrides: Sequence[tuple[list[nn.Parameter], dict[str, Any]]] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params``; ``overrides`` are ``(parameters, settings)`` groups (e.g. a KD
    method's own lr and weight decay), taken out of the default groups.

    An override's ``settings["optimizer"]`` (``"sgd"``, ``"adam"``, ``"adamw"``) trains its group
    with that kind of optimizer; the result is then an :class:`OptimizerChain` of the run's
    optimizer and one more per kind. Without it (or with the run's own kind) the group joins
    the run's optimizer, and a plain optimizer is returned, as before.
    """
    special = {id(p) for group, _ in overrides for p in group}
    # No weight decay on norm parameters and biases: the usual detection recipe.
    decay = [p for p in params if p.requires_grad and p.ndim > 1 and id(p) not in special]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1 and id(p) not in special]
    groups: dict[str, list[dict[str, Any]]] = {cfg.optimizer: [{"params": decay, "weight_decay": cfg.weight_decay},
                                                               {"params": no_decay, "weight_decay": 0.0}]}
    for group, settings in overrides:
        settings = dict(settings)
        kind = settings.pop("optimizer", None) or cfg.optimizer
        if kind not in OPTIMIZER_KINDS:
            raise ValueError(f"optimizer {kind!r} for a method's own parameters: expected one of {sorted(OPTIMIZER_KINDS)}")
        groups.setdefault(kind, []).append({"params": [p for p in group if p.requires_grad], **settings})
    optimizers = [_make(kind, kind_groups, cfg) for kind, kind_groups in groups.items()]
    return optimizers[0] if len(optimizers) == 1 else OptimizerChain(optimizers)


def _make(kind: str, groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return OPTIMIZER_KINDS[kind](groups, lr=cfg.lr)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return 0.001 + (1 - 0.001) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * cfg.steps for m in cfg.milestones)
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
