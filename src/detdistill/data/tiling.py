"""Sliding-window inference helpers: split a large image into tiles, merge tile detections.

Objects of ~20 px in a 4000 px image survive only at native resolution; tiles keep memory
bounded, and the overlap makes every object appear whole in at least one tile when it is
smaller than the overlap. Duplicates from overlapping tiles are removed by class-wise NMS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detdistill.structures import Detections

#: One tile's predictions: boxes ``(D, 4)`` xyxy in tile pixels, scores ``(D,)``,
#: labels ``(D,)`` int64, and the tile origin ``(x0, y0)`` in image pixels.
TileDetections = tuple[Tensor, Tensor, Tensor, tuple[int, int]]


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # last tile flush with the edge, never past it
    return starts


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles covering a ``width x height`` image, row-major.

    Tiles are ``tile x tile`` (smaller only if the image is), start every ``tile - overlap``
    px, and the last row/column is shifted to end exactly at the image edge, so consecutive
    tiles overlap by at least ``overlap`` px and no tile leaves the image.

    Returns:
        ``[(x0, y0, x1, y1), ...]`` integer pixel windows (``x1``/``y1`` exclusive).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    stride = tile - overlap
    xs, ys = _starts(width, tile, stride), _starts(height, tile, stride)
    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


def merge_tile_detections(
    per_tile: Sequence[TileDetections],
    iou: float = 0.6,
    max_dets: int = 300,
) -> Detections:
    """Shift tile detections to image coordinates and remove duplicates by class-wise NMS.

    Args:
        per_tile: one ``(boxes (D_i, 4), scores (D_i,), labels (D_i,), (x0, y0))`` per tile.
        iou: NMS IoU threshold (``torchvision.ops.batched_nms``, per label).
        max_dets: keep at most this many detections (highest scores).

    Returns:
        :class:`Detections` in image pixels, sorted by decreasing score.
    """
    if not per_tile:
        return Detections.empty()
    boxes, scores, labels = [], [], []
    for b, s, lab, (x0, y0) in per_tile:
        boxes.append(b.float().reshape(-1, 4) + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=b.device))
        scores.append(s.float().reshape(-1))
        labels.append(lab.long().reshape(-1))
    all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(all_boxes, all_scores, all_labels, iou)[:max_dets]  # sorted by score
    return Detections(all_boxes[keep], all_scores[keep], all_labels[keep])
