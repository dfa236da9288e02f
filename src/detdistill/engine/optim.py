"""Optimizers and learning-rate schedules (linear warmup, then cosine / step / constant)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter],
                    overrides: Sequence[tuple[list[nn.Parameter], dict[str, Any]]] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params``; ``overrides`` are ``(parameters, settings)`` groups (e.g. a KD
    method's own lr and weight decay), taken out of the default groups."""
    special = {id(p) for group, _ in overrides for p in group}
    # No weight decay on norm parameters and biases: the usual detection recipe.
    decay = [p for p in params if p.requires_grad and p.ndim > 1 and id(p) not in special]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1 and id(p) not in special]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": [p for p in group if p.requires_grad], **settings} for group, settings in overrides]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


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
