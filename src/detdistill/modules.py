"""Small helpers on ``nn.Module`` that every layer of the package shares."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers.

    Every layer lookup goes through this, so tap names never carry a ``module.``
    prefix (the classic silent-zero-KD-loss bug under DDP).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
