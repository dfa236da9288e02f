"""Framework-neutral data types that cross the adapter seam.

Everything outside ``adapters/`` speaks these types: pixels, xyxy boxes and
contiguous class indices ``0..C-1``. Each adapter converts to and from its
framework's own contract (torchvision target dicts, DETR's normalised cxcywh,
ultralytics' batch dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth for one (possibly cropped) image.

    Attributes:
        boxes: ``(K, 4)`` float32, xyxy in pixels of the image tensor it belongs to.
        labels: ``(K,)`` int64, contiguous class indices ``0..C-1``.
        image_id: the dataset-wide image id (the COCO id for COCO data).
        path: the source image file.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int
    path: Path | None = None

    def to(self, device: torch.device | str) -> "Target":
        return Target(self.boxes.to(device), self.labels.to(device), self.image_id, self.path)


@dataclass
class Batch:
    """A collated batch: images may differ in size (adapters pad as their framework needs).

    Attributes:
        images: ``B`` float tensors ``(3, H_i, W_i)`` in ``[0, 1]``, RGB, not normalised.
        targets: ``B`` :class:`Target` objects, boxes in each image's pixel frame.
    """

    images: list[Tensor]
    targets: list[Target]

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch([im.to(device, non_blocking=True) for im in self.images], [t.to(device) for t in self.targets])


@dataclass
class Detections:
    """Predictions for one image, in the pixel frame of the image given to ``predict``.

    Attributes:
        boxes: ``(D, 4)`` float32 xyxy pixels.
        scores: ``(D,)`` float32 confidences in ``[0, 1]``.
        labels: ``(D,)`` int64 contiguous class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @staticmethod
    def empty() -> "Detections":
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


@dataclass(frozen=True)
class TapInfo:
    """Metadata of a tappable layer, so connectors can size themselves (cf. timm ``feature_info``).

    Attributes:
        name: the public tap name (``"fpn.p3"`` or a raw module path such as ``"backbone.body.layer2"``).
        module: dotted path of the hooked module inside the *unwrapped* model.
        key: for modules returning a dict/tuple, which entry of the output this tap selects
            (``None``: the output itself).
        channels: feature channels ``C`` (``0`` when the output is not a feature map).
        stride: input pixels per feature pixel (``0`` when unknown / not spatial).
        kind: ``"feature"`` for ``(N, C, H, W)`` maps, ``"other"`` otherwise.
    """

    name: str
    module: str
    key: str | int | None = None
    channels: int = 0
    stride: int = 0
    kind: str = "feature"


@dataclass
class RawOutputs:
    """What logit-level KD needs from a forward pass; framework-neutral.

    Attributes:
        cls_logits: dense-head class logits ``(N, A, C)`` over all anchors/points of all
            levels (``None`` for heads without dense logits, e.g. two-stage detectors).
        extra: anything else an adapter exposes (DETR per-layer logits and boxes, ...).
    """

    cls_logits: Tensor | None = None
    extra: dict[str, object] = field(default_factory=dict)
