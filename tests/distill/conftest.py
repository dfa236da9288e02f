"""Local fixtures for the distillation-core tests: tiny torchvision detectors and one fixed batch.

Everything is CPU-sized on purpose (ResNet-18, FPN width 32, 96x128 images, batch 2): the
suite runs next to long trainings on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from detdistill.adapters.base import DetectorAdapter, get_adapter
from detdistill.config import ModelConfig
from detdistill.structures import Batch, Target

IMAGE_H, IMAGE_W = 96, 128  # multiples of 32: the padded network input equals the image
NUM_CLASSES = 3


def make_batch(n: int = 2, h: int = IMAGE_H, w: int = IMAGE_W, seed: int = 0) -> Batch:
    """``n`` random images with a small (<32 px), a medium and a large (>96 px) object among them."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for _ in range(n)]
    boxes = [
        torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 20.0, 88.0, 68.0]]),  # 16x16 small, 48x48 medium
        torch.tensor([[10.0, 3.0, 120.0, 93.0], [70.0, 50.0, 86.0, 66.0]]),  # 110x90 large, 16x16 small
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 0])]
    return Batch(images, [Target(boxes[i % 2].clone(), labels[i % 2].clone(), image_id=i) for i in range(n)])


@pytest.fixture(scope="session")
def adapter() -> DetectorAdapter:
    return get_adapter("torchvision")


@pytest.fixture
def batch() -> Batch:
    return make_batch()


@pytest.fixture(scope="session")
def batch_maker() -> Callable[..., Batch]:
    """:func:`make_batch` itself, for tests that need several batches (``batch_maker(seed=1)``)."""
    return make_batch


@pytest.fixture(scope="session")
def build(adapter: DetectorAdapter) -> Callable[..., nn.Module]:
    """``build(arch, backbone=..., fpn=32, norm='bn', head_convs=None, seed=0)``: a seeded, tiny detector."""

    def _build(arch: str = "fcos", *, backbone: str = "resnet18", fpn: int = 32, norm: str = "bn",
               head_convs: int | None = None, seed: int = 0) -> nn.Module:
        if head_convs is None:
            head_convs = 4 if arch == "retinanet" else 1  # RetinaNetHead has a fixed depth
        torch.manual_seed(seed)
        cfg = ModelConfig(arch=arch, backbone=backbone, fpn_channels=fpn, norm=norm, head_convs=head_convs)
        return adapter.build(cfg, NUM_CLASSES)

    return _build


@pytest.fixture(scope="session")
def sgd() -> Callable[..., tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
    """``sgd(params, lr=0.01)``: a plain SGD optimizer with a constant schedule, for ``train_one_step``."""

    def _sgd(params: list[nn.Parameter], lr: float = 0.01):
        opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)

    return _sgd


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny models run next to a long training on 2 cores, where
    extra threads only contend (4-8x slower); restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
