"""Scale-assigned Gaussian foreground masks for MSSD.

MSSD (Jia et al., "MSSD: multi-scale self-distillation for object detection", Visual
Intelligence 2024) encodes each ground-truth box with Gaussian values peaking at the box
centre, sets the background to 0, and puts small objects on the large (stride-8) map,
medium objects on the medium map and large objects on the small (stride-32) map.

The paper leaves open the exact Gaussian and the size
thresholds. Choices made here:

* **Scale assignment**: by ``s = sqrt(w * h)`` in input pixels against ``size_thresholds``
  (default COCO's 32 and 96): ``s < 32`` -> stride 8, ``32 <= s < 96`` -> stride 16,
  otherwise stride 32. Each object lands on exactly one map.
* **Gaussian**: axis-aligned, evaluated at feature-cell centres ``((i + 0.5) * stride)`` px::

      g(x, y) = exp(-((x - cx)^2 / (2 sx^2) + (y - cy)^2 / (2 sy^2)))

  then divided by its value at the cell containing the box centre (the maximum over the
  box's cells), so that cell holds exactly 1.0 even when the centre falls between cell
  centres. Boxes cut by the frame with their centre off the map keep only their tail.
* **Sigma**: ``'centernet'`` takes the CenterNet/CornerNet radius ``r`` (in cells
  of the assigned map) for a min-IoU of 0.7 and ``sigma = (2r + 1) / 6`` (the diameter
  spans +-3 sigma), the same for both axes. Unlike the widely copied reference code, the
  quadratic roots are solved exactly (the reference drops the ``1/(2a)`` factor in two of
  the three cases and so overestimates ``r``). ``'box_fraction'`` (the default) uses
  ``sx = w * sigma_fraction``, ``sy = h * sigma_fraction`` in pixels (TTFNet-like
  elongated Gaussians); the default ``1/6`` puts the box edges at 3 sigma.
* **Truncation**: 0 outside the box. A cell belongs to a box when its centre lies inside it;
  along an axis where the box covers no cell centre (objects thinner than one stride), the
  cell containing the box centre is used, so no in-frame object vanishes from its map.
* **Overlaps**: element-wise max over objects (as in CenterNet heatmaps).

Boxes are xyxy pixels in the padded input frame of the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .box_cells import box_axis_cells

SigmaMode = Literal["centernet", "box_fraction"]

__all__ = ["gaussian_masks", "centernet_radius", "assign_levels"]


def centernet_radius(w: Tensor, h: Tensor, min_overlap: float = 0.7) -> Tensor:
    """Largest corner displacement ``r`` keeping IoU >= ``min_overlap`` (CornerNet/CenterNet).

    Three worst cases, each a quadratic in ``r`` whose smaller root (or positive root) bounds
    ``r``; the radius is their minimum, clamped at 0. With ``o = min_overlap``:

    1. both corners shifted by ``r`` the same way (same size box):
       ``(w - r)(h - r) / (2wh - (w - r)(h - r)) = o``
       -> ``r^2 - (w + h) r + wh (1 - o) / (1 + o) = 0``;
    2. both corners moved inwards (predicted box inside the GT):
       ``(w - 2r)(h - 2r) / (wh) = o`` -> ``4 r^2 - 2 (w + h) r + (1 - o) wh = 0``;
    3. both corners moved outwards (predicted box contains the GT):
       ``wh / ((w + 2r)(h + 2r)) = o`` -> ``4 o r^2 + 2 o (w + h) r - (1 - o) wh = 0``.

    Args:
        w, h: box sizes (any unit; ``r`` comes out in the same unit), same shape.
        min_overlap: IoU the displaced box must keep.

    Returns:
        ``r`` with the shape of ``w``.
    """
    o = min_overlap
    s = w + h
    wh = w * h
    # Case 1: smaller root of r^2 - s r + c1 = 0.
    c1 = wh * (1 - o) / (1 + o)
    r1 = (s - torch.sqrt((s * s - 4 * c1).clamp(min=0))) / 2
    # Case 2: smaller root of 4 r^2 - 2 s r + (1 - o) wh = 0.
    r2 = (2 * s - torch.sqrt((4 * s * s - 16 * (1 - o) * wh).clamp(min=0))) / 8
    # Case 3: positive root of 4o r^2 + 2o s r - (1 - o) wh = 0.
    r3 = (-2 * o * s + torch.sqrt(4 * o * o * s * s + 16 * o * (1 - o) * wh)) / (8 * o)
    return torch.minimum(torch.minimum(r1, r2), r3).clamp(min=0)


def assign_levels(boxes: Tensor, size_thresholds: Sequence[float]) -> Tensor:
    """Level index per box from ``sqrt(w * h)``: ``(K, 4)`` xyxy -> ``(K,)`` int64.

    Level ``l`` gets sizes in ``[thresholds[l-1], thresholds[l])`` (level 0: below the first).
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    size = torch.sqrt(wh[:, 0] * wh[:, 1])
    thr = torch.as_tensor(list(size_thresholds), dtype=size.dtype, device=size.device)
    return torch.bucketize(size, thr, right=True)


def _axis_profile(
    centre: Tensor, lo: Tensor, hi: Tensor, sigma: Tensor, n_cells: int, stride: int
) -> Tensor:
    """Per-object normalised, truncated 1-D Gaussian over cell centres: ``(K,)`` -> ``(K, n_cells)``.

    Normalised in log space, so the cell holding the centre is exactly 1.0 (0 - 0 -> exp(0)).
    """
    pos = (torch.arange(n_cells, device=centre.device, dtype=centre.dtype) + 0.5) * stride  # (n,)
    inside = box_axis_cells(lo, hi, n_cells, stride)  # (K, n); sub-stride objects keep their centre's cell
    two_var = 2 * sigma[:, None] ** 2
    expo = -((pos[None] - centre[:, None]) ** 2) / two_var  # (K, n)
    # The best lattice cell of a box is the one holding its centre, so normalising by it puts
    # the peak (exactly 1.0) there; for boxes cut by the frame whose centre is off the map
    # it keeps the Gaussian's tail instead of re-peaking at the border. The masked max only
    # guards against float ties at cell boundaries, so nothing ever exceeds 1.
    centre_pos = (torch.floor(centre / stride) + 0.5) * stride
    peak = -((centre_pos - centre) ** 2)[:, None] / two_var
    peak = torch.maximum(peak, expo.masked_fill(~inside, float("-inf")).amax(dim=1, keepdim=True))
    return torch.exp(expo - peak) * inside


def gaussian_masks(
    boxes_per_image: list[Tensor],
    image_size: tuple[int, int],
    strides: Sequence[int] = (8, 16, 32),
    size_thresholds: Sequence[float] = (32.0, 96.0),
    sigma_mode: SigmaMode = "box_fraction",
    sigma_fraction: float = 1.0 / 6.0,
    feature_sizes: Sequence[tuple[int, int]] | None = None,
    min_overlap: float = 0.7,
) -> list[Tensor]:
    """One Gaussian foreground mask per scale, each object on the one scale its size selects.

    Args:
        boxes_per_image: ``N`` tensors ``(K_i, 4)`` xyxy pixels in the padded input frame.
        image_size: ``(H, W)`` of the padded network input.
        strides: one stride per level, finest first.
        size_thresholds: ``len(strides) - 1`` increasing ``sqrt(area)`` bounds in pixels.
        sigma_mode: ``'box_fraction'`` (default, as :class:`~detdistill.losses.mssd.MSSDLoss`:
            ``sigma = (w, h) * sigma_fraction`` pixels, the Gaussian spans the box) or
            ``'centernet'`` (radius from min-IoU ``min_overlap``, ``sigma = (2r+1)/6`` cells).
        sigma_fraction: only for ``'box_fraction'``.
        feature_sizes: optional ``(H_l, W_l)`` per level to match actual feature maps;
            default ``(ceil(H / s_l), ceil(W / s_l))``.
        min_overlap: only for ``'centernet'``.

    Returns:
        ``len(strides)`` tensors ``(N, 1, H_l, W_l)`` in ``[0, 1]`` (float32 on the boxes' device;
        CPU when there are no images with boxes).
    """
    if len(size_thresholds) != len(strides) - 1:
        raise ValueError(f"need len(strides) - 1 = {len(strides) - 1} size thresholds, got {len(size_thresholds)}")
    if sigma_mode not in ("centernet", "box_fraction"):
        raise ValueError(f"sigma_mode must be 'centernet' or 'box_fraction', got {sigma_mode!r}")
    H, W = image_size
    if feature_sizes is None:
        feature_sizes = [(math.ceil(H / s), math.ceil(W / s)) for s in strides]
    device = boxes_per_image[0].device if boxes_per_image else torch.device("cpu")
    n = len(boxes_per_image)
    masks = [torch.zeros(n, 1, fh, fw, device=device) for fh, fw in feature_sizes]

    for i, boxes in enumerate(boxes_per_image):
        boxes = boxes.detach().to(device=device, dtype=torch.float32).reshape(-1, 4)
        wh = boxes[:, 2:] - boxes[:, :2]
        boxes = boxes[(wh > 0).all(dim=1)]  # degenerate boxes have no region to encode
        if boxes.numel() == 0:
            continue
        levels = assign_levels(boxes, size_thresholds)
        for lvl, (stride, (fh, fw)) in enumerate(zip(strides, feature_sizes)):
            b = boxes[levels == lvl]
            if b.numel() == 0:
                continue
            w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            if sigma_mode == "centernet":
                r = centernet_radius(w / stride, h / stride, min_overlap)
                sx = sy = (2 * r + 1) / 6 * stride  # cells -> pixels
            else:
                sx, sy = w * sigma_fraction, h * sigma_fraction
            gx = _axis_profile(cx, b[:, 0], b[:, 2], sx, fw, stride)  # (K, W_l)
            gy = _axis_profile(cy, b[:, 1], b[:, 3], sy, fh, stride)  # (K, H_l)
            # Separable Gaussian; overlapping objects combine by max.
            g = (gy[:, :, None] * gx[:, None, :]).amax(dim=0)
            masks[lvl][i, 0] = torch.maximum(masks[lvl][i, 0], g)
    return masks
