r"""Model EMA: an exponential moving average of the weights, evaluated and exported instead of them.

As ultralytics, YOLOX/RTMDet and D-FINE do: after every optimizer step

.. math:: \theta_{EMA} \leftarrow d_t\, \theta_{EMA} + (1 - d_t)\, \theta,
   \qquad d_t = d \cdot (1 - e^{-t / \tau})

where ``t`` counts the updates so far, so the average follows the weights closely early on
(``d_t`` near 0) and settles to a window of about ``1 / (1 - d)`` steps. Buffers (BatchNorm
statistics) are averaged the same way; integer buffers take the latest value. Built on
``torch.optim.swa_utils.AveragedModel``, which keeps the copy and its update count
(``n_averaged``, checkpointed with it, so a resumed run continues the same average).

The defaults (``d`` = 0.99, ``τ`` = 50 steps) fit detdistill's CPU-sized schedules of a few
hundred steps: the average spans the last ~100 steps. ultralytics' (0.9999, 2000) are for runs
of 100k+ steps; set ``train.ema_decay`` / ``train.ema_warmup_steps`` for long GPU runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["ema_decay", "build_ema"]


def ema_decay(updates: int, decay: float, warmup_steps: float) -> float:
    """``d_t = decay · (1 - exp(-updates / warmup_steps))`` for the ``updates``-th update (1-based)."""
    return decay * (1.0 - math.exp(-updates / warmup_steps))


def build_ema(model: nn.Module, decay: float = 0.99, warmup_steps: float = 50.0) -> AveragedModel:
    """An ``AveragedModel`` of ``model`` (unwrapped, not DDP) with the ramped EMA above.

    Call ``ema.update_parameters(model)`` after each optimizer step; ``ema.module`` is the
    averaged model. Its first update copies the weights (``AveragedModel``'s own rule).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
    if warmup_steps <= 0:
        raise ValueError(f"train.ema_warmup_steps must be > 0, got {warmup_steps}")

    def multi_avg_fn(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # num_averaged counts the updates before this one; this one is update num_averaged + 1
        d = ema_decay(int(num_averaged) + 1, decay, warmup_steps)
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): not averageable, keep the latest
            for a, c in zip(averaged, current):
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
