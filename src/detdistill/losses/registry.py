"""Registry of distillation losses: name -> ``nn.Module`` class.

Names in use: ``'l2'``, ``'l1'``, ``'pkd'``, ``'ssim'``, ``'kl'``. Build one with
``LOSSES.get(name)(**kwargs)``.
"""

from __future__ import annotations

from typing import Any

from detdistill.registry import Registry

LOSSES: Registry[Any] = Registry("distillation method")

__all__ = ["LOSSES"]
