"""Small helpers on ``nn.Module`` that every layer of the package shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in (train or eval)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers.

    Every layer lookup goes through this, so tap names never carry a ``module.``
    prefix (the classic silent-zero-KD-loss bug under DDP).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextmanager
def frozen_pass(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (its forward or any of its parts) without training it or changing its state.

    Inside the block every parameter is replaced by a detached view, so gradients flow to the
    *inputs* only (and DistributedDataParallel sees no second use of its parameters), and
    every buffer by a copy, so BatchNorm statistics updated in the block are thrown away. The
    originals are never written in place, so graphs built before the block stay valid. Used
    where a method sends other features through the student's own head (ScaleKD's assistant).
    """
    saved: list[tuple[dict[str, Any], str, Any]] = []
    for module in model.modules():
        for store, make in ((module._parameters, lambda t: t.detach()), (module._buffers, lambda t: t.clone())):
            for name, t in list(store.items()):
                if t is not None:
                    saved.append((store, name, t))
                    store[name] = make(t)
    try:
        yield model
    finally:
        for store, name, t in saved:
            store[name] = t
