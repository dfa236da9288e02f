"""Box-aware train/eval transforms (torchvision.transforms.v2 on ``tv_tensors``).

Training on large aerial images with ~20-60 px objects means: crop instead of resize
(resizing a 4000 px image to a network size would erase the objects), jitter the scale
mildly, and bias crops towards objects so that most crops contain some.

Reproducibility: every random draw comes from ``torch`` inside ``torch.random.fork_rng()``
seeded with the per-sample seed, and the number of draws is fixed, so ``(sample, seed)``
determines the output whatever process, worker or global RNG state runs it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detdistill.data.sample import Sample
from detdistill.structures import Target

if TYPE_CHECKING:
    from detdistill.config import DataConfig


def _targets_from(sample: Sample) -> tuple[Tensor, Tensor]:
    """Non-crowd boxes ``(K, 4)`` float32 and labels ``(K,)`` int64 (crowd regions are not targets)."""
    keep = ~sample.iscrowd
    return torch.from_numpy(sample.boxes[keep]).float(), torch.from_numpy(sample.labels[keep]).long()


class TrainTransform:
    """Scale jitter + (object-centred) random crop + flips, boxes transformed alongside.

    Steps, for a crop of ``S = crop_size`` px:

    1. draw a scale ``s`` log-uniformly in ``scale_range`` (``s > 1`` enlarges);
    2. pick a window of ``round(S / s)`` source pixels: with probability
       ``object_centered_crop_p`` its centre is within a quarter window of a random object's
       centre (then clamped into the image, which keeps that centre inside), otherwise
       uniformly placed; where the image is smaller than the window it is zero-padded;
    3. crop and resize the window to ``S x S`` (only the window is resized: cheap on 4000 px
       images);
    4. keep boxes whose visible area fraction in the window is ``>= min_visible`` (clipped to
       it), then drop boxes narrower or shorter than ``min_size`` output px;
    5. horizontal / vertical flips with probabilities ``hflip`` / ``vflip``.

    Crowd boxes (``Sample.iscrowd``) are not part of the target.
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.75, 1.33),
        hflip: float = 0.5,
        vflip: float = 0.0,
        object_centered_crop_p: float = 0.5,
        min_visible: float = 0.5,
        min_size: float = 2.0,
    ) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        for name, p in (("hflip", hflip), ("vflip", vflip), ("object_centered_crop_p", object_centered_crop_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.crop_size = int(crop_size)
        self.scale_range = (float(lo), float(hi))
        self.hflip, self.vflip = hflip, vflip
        self.object_centered_crop_p = object_centered_crop_p
        self.min_visible, self.min_size = min_visible, min_size

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, hflip={self.hflip}, "
            f"vflip={self.vflip}, object_centered_crop_p={self.object_centered_crop_p}, "
            f"min_visible={self.min_visible}, min_size={self.min_size})"
        )

    def __call__(self, image: Tensor, sample: Sample, seed: int) -> tuple[Tensor, Target]:
        """Augment one image.

        Args:
            image: ``(3, H, W)`` uint8 RGB, ``H, W`` = ``sample.height, sample.width``.
            sample: its annotations (xyxy pixels).
            seed: determines every random choice.

        Returns:
            ``(3, S, S)`` float32 image in ``[0, 1]`` and its :class:`Target` (boxes in crop pixels).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # A fixed number of draws: which branch runs never shifts later random numbers.
            r = torch.rand(7, dtype=torch.float64).tolist()
            return self._apply(image, sample, r)

    def _window_origin(self, size: int, win: int, centre: float | None, u: float) -> int:
        lo, hi = min(0, size - win), max(0, size - win)  # origins keeping the window on the image
        if centre is None:
            return lo + min(int(u * (hi - lo + 1)), hi - lo)
        jitter = (2.0 * u - 1.0) * win / 4
        return int(min(max(round(centre - win / 2 + jitter), lo), hi))

    def _apply(self, image: Tensor, sample: Sample, r: list[float]) -> tuple[Tensor, Target]:
        _, H, W = image.shape
        boxes, labels = _targets_from(sample)
        S = self.crop_size

        lo, hi = self.scale_range
        scale = math.exp(math.log(lo) + r[0] * (math.log(hi) - math.log(lo)))
        win = max(1, round(S / scale))

        cx = cy = None
        if len(boxes) and r[1] < self.object_centered_crop_p:
            k = min(int(r[2] * len(boxes)), len(boxes) - 1)
            cx, cy = float(boxes[k, 0] + boxes[k, 2]) / 2, float(boxes[k, 1] + boxes[k, 3]) / 2
        left = self._window_origin(W, win, cx, r[3])
        top = self._window_origin(H, win, cy, r[4])

        # Visibility is measured before the crop clamps boxes to the window.
        shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = shifted.clamp(0, win)
        area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
        vis_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = vis_area >= self.min_visible * area.clamp_min(1e-6)
        boxes, labels = boxes[keep], labels[keep]

        img = tv_tensors.Image(image)
        bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W))
        img, bb = F.crop(img, top, left, win, win), F.crop(bb, top, left, win, win)  # zero-pads outside
        if win != S:
            img = F.resize(img, [S, S], antialias=True)
            bb = F.resize(bb, [S, S])
        if r[5] < self.hflip:
            img, bb = F.horizontal_flip(img), F.horizontal_flip(bb)
        if r[6] < self.vflip:
            img, bb = F.vertical_flip(img), F.vertical_flip(bb)

        out = bb.as_subclass(Tensor).clamp(0, S)
        big = ((out[:, 2] - out[:, 0]) >= self.min_size) & ((out[:, 3] - out[:, 1]) >= self.min_size)
        image_f = F.to_dtype(img.as_subclass(Tensor), torch.float32, scale=True)
        return image_f, Target(out[big].float().contiguous(), labels[big], sample.image_id, sample.path)


class EvalTransform:
    """Full image to float ``[0, 1]``, no resize (models run at native resolution)."""

    def __repr__(self) -> str:
        return "EvalTransform()"

    def __call__(self, image: Tensor, sample: Sample, seed: int | None = None) -> tuple[Tensor, Target]:
        """``(3, H, W)`` uint8 -> ``(3, H, W)`` float32 in ``[0, 1]`` and the non-crowd :class:`Target`."""
        boxes, labels = _targets_from(sample)
        return F.to_dtype(image, torch.float32, scale=True), Target(boxes, labels, sample.image_id, sample.path)


def train_transform(d: "DataConfig") -> TrainTransform:
    """The training augmentation a config's ``data`` section describes (also used by the
    benchmark scripts, so they draw exactly the crops ``train`` does)."""
    return TrainTransform(d.crop_size, scale_range=d.scale_range, hflip=d.hflip, vflip=d.vflip,
                          object_centered_crop_p=d.object_centered_crop_p, min_size=max(d.min_box_size, 1.0))
