"""tile_windows coverage and merge_tile_detections against a brute-force NMS."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from detdistill.data import merge_tile_detections, tile_windows


@pytest.mark.parametrize(
    ("w", "h", "tile", "overlap"),
    [(1000, 700, 256, 64), (896, 512, 512, 128), (300, 200, 512, 64), (4000, 2250, 1024, 200), (513, 512, 512, 0)],
)
def test_windows_cover_every_pixel_and_stay_inside(w: int, h: int, tile: int, overlap: int) -> None:
    wins = tile_windows(w, h, tile, overlap)
    cover = torch.zeros(h, w, dtype=torch.int32)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(tile, w) and y1 - y0 == min(tile, h)
        cover[y0:y1, x0:x1] += 1
    assert (cover >= 1).all()
    xs = sorted({x0 for x0, *_ in wins})
    assert max(x1 for *_, x1, _ in wins) == w  # last column flush with the edge
    assert all(b - a <= tile - overlap for a, b in zip(xs, xs[1:]))  # overlap at least `overlap`
    assert len(wins) == len(set(wins))


def test_window_argument_checks() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(100, 100, 64, 64)


def _brute_force(boxes, scores, labels, iou):
    keep = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if all(labels[j] != labels[i] or box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= iou for j in keep):
            keep.append(i)
    return keep


def test_merge_matches_brute_force_nms() -> None:
    g = torch.Generator().manual_seed(0)
    per_tile, shifted = [], []
    for x0, y0, *_ in tile_windows(300, 200, 128, 48):
        n = 12
        xy = torch.rand(n, 2, generator=g) * 100
        b = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], 1)
        s = torch.rand(n, generator=g)
        lab = torch.randint(0, 3, (n,), generator=g)
        per_tile.append((b, s, lab, (x0, y0)))
        shifted.append((b + torch.tensor([x0, y0, x0, y0]), s, lab))
    boxes = torch.cat([b for b, _, _ in shifted])
    scores = torch.cat([s for _, s, _ in shifted])
    labels = torch.cat([lab for _, _, lab in shifted])
    expect = _brute_force(boxes, scores, labels.tolist(), 0.5)
    dets = merge_tile_detections(per_tile, iou=0.5)
    torch.testing.assert_close(dets.boxes, boxes[expect])
    torch.testing.assert_close(dets.scores, scores[expect])
    assert dets.labels.tolist() == labels[expect].tolist()
    top = merge_tile_detections(per_tile, iou=0.5, max_dets=5)
    torch.testing.assert_close(top.scores, scores[expect][:5])


def test_duplicate_from_overlapping_tiles_is_merged() -> None:
    one = torch.tensor([[10.0, 10, 30, 30]])
    dets = merge_tile_detections(
        [
            (one + 90, torch.tensor([0.9]), torch.tensor([1]), (0, 0)),  # image box 100..120
            (one, torch.tensor([0.8]), torch.tensor([1]), (90, 90)),  # the same object, next tile
            (one, torch.tensor([0.7]), torch.tensor([2]), (90, 90)),  # another class: kept
        ]
    )
    torch.testing.assert_close(dets.boxes, torch.tensor([[100.0, 100, 120, 120], [100, 100, 120, 120]]))
    assert dets.labels.tolist() == [1, 2]
    assert len(merge_tile_detections([]).boxes) == 0
