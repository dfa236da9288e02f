"""TrainTransform / EvalTransform: geometry by hand, determinism, small-object crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detdistill.data import EvalTransform, Sample, TrainTransform


def _sample(w: int, h: int, boxes, labels=None, iscrowd=None) -> Sample:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else labels
    return Sample(0, Path("synthetic.png"), w, h, boxes, labels, iscrowd)


def _image(w: int, h: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _random_sample(seed: int, w: int = 500, h: int = 300, k: int = 30) -> Sample:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w, h], (k, 2))
    wh = rng.uniform(3, 60, (k, 2))
    return _sample(w, h, np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1), rng.integers(0, 3, k))


def test_boxes_stay_inside_the_crop_and_respect_min_size() -> None:
    t = TrainTransform(128, min_size=2.0)
    sample, image = _random_sample(0), _image(500, 300)
    kept = 0
    for seed in range(25):
        img, tgt = t(image, sample, seed)
        assert img.shape == (3, 128, 128) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert tgt.boxes.dtype == torch.float32 and tgt.labels.dtype == torch.int64
        assert (tgt.boxes >= 0).all() and (tgt.boxes <= 128).all()
        assert ((tgt.boxes[:, 2:] - tgt.boxes[:, :2]) >= 2.0).all()
        kept += len(tgt.boxes)
    assert kept > 0


def test_same_seed_same_output_different_seed_different_output() -> None:
    t = TrainTransform(96, vflip=0.5)
    sample, image = _random_sample(1), _image(500, 300)
    a_img, a_tgt = t(image, sample, 7)
    torch.manual_seed(999)  # the global RNG state must not matter ...
    b_img, b_tgt = t(image, sample, 7)
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt.boxes, b_tgt.boxes) and torch.equal(a_tgt.labels, b_tgt.labels)
    state = torch.random.get_rng_state()
    outs = [t(image, sample, s)[0] for s in range(1, 6)]
    assert torch.equal(state, torch.random.get_rng_state())  # ... and is left untouched
    assert all(not torch.equal(a_img, o) for o in outs)


def test_hflip_and_vflip_mirror_boxes_and_pixels() -> None:
    # Crop == image and scale 1: the window is the image, so only the flip acts.
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    image[:, 20, 10] = 255  # a marker pixel at (x=10, y=20)
    sample = _sample(100, 100, [[10, 20, 30, 50]])
    kw = dict(scale_range=(1.0, 1.0), object_centered_crop_p=0.0)
    img, tgt = TrainTransform(100, hflip=1.0, vflip=0.0, **kw)(image, sample, seed=3)
    torch.testing.assert_close(tgt.boxes, torch.tensor([[100 - 30, 20, 100 - 10, 50]], dtype=torch.float32))
    assert img[0, 20, 100 - 1 - 10] == 1.0 and img[0].sum() == 1.0
    img, tgt = TrainTransform(100, hflip=0.0, vflip=1.0, **kw)(image, sample, seed=3)
    torch.testing.assert_close(tgt.boxes, torch.tensor([[10, 100 - 50, 30, 100 - 20]], dtype=torch.float32))
    assert img[0, 100 - 1 - 20, 10] == 1.0


def test_scale_and_visibility_by_hand() -> None:
    # Internal draw vector r = [scale, centred?, object, x, y, hflip, vflip] fixes the choices.
    image = _image(200, 100)
    sample = _sample(200, 100, [[80, 10, 120, 30], [20, 40, 30, 60]], labels=np.array([1, 2]))
    t = TrainTransform(100, scale_range=(1.0, 1.0), object_centered_crop_p=0.0, min_visible=0.5)
    _, tgt = t._apply(image, sample, [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # window x 0..100
    torch.testing.assert_close(tgt.boxes, torch.tensor([[80.0, 10, 100, 30], [20, 40, 30, 60]]))  # 20/40 visible
    assert tgt.labels.tolist() == [1, 2]
    t.min_visible = 0.6
    _, tgt = t._apply(image, sample, [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert tgt.labels.tolist() == [2]
    # Scale 2 (window of 50 source px) doubles boxes: window x 0..50, y 0..50.
    t = TrainTransform(100, scale_range=(2.0, 2.0), object_centered_crop_p=0.0, min_visible=0.5)
    _, tgt = t._apply(image, sample, [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(tgt.boxes, torch.tensor([[40.0, 80, 60, 100]]))  # box 2 rows 40..50 -> 50% visible


def test_small_image_is_zero_padded() -> None:
    image = torch.full((3, 40, 60), 255, dtype=torch.uint8)
    img, tgt = TrainTransform(128, scale_range=(1.0, 1.0))(image, _sample(60, 40, [[5, 5, 20, 20]]), seed=0)
    assert img.shape == (3, 128, 128)
    assert img.sum() == pytest.approx(3 * 40 * 60)  # the image once, the rest zeros
    assert len(tgt.boxes) == 1 and (tgt.boxes[0, 2:] - tgt.boxes[0, :2]).tolist() == [15.0, 15.0]


def test_object_centred_crops_keep_small_objects() -> None:
    image = _image(2000, 1500)
    sample = _sample(2000, 1500, [[1500, 300, 1510, 310]])
    centred = TrainTransform(256, object_centered_crop_p=1.0)
    uniform = TrainTransform(256, object_centered_crop_p=0.0)
    hits_c = sum(len(centred(image, sample, s)[1].boxes) for s in range(20))
    hits_u = sum(len(uniform(image, sample, s)[1].boxes) for s in range(20))
    assert hits_c == 20  # always fully inside (centre within a quarter window of the crop centre)
    assert hits_u <= 3  # a 256 px window hits a fixed point of 2000x1500 rarely


def test_crowd_boxes_are_not_targets_and_background_works() -> None:
    sample = _sample(64, 64, [[0, 0, 64, 64], [10, 10, 30, 30]], np.array([0, 1]), np.array([True, False]))
    img, tgt = EvalTransform()(_image(64, 64), sample)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and img.max() <= 1.0
    assert tgt.labels.tolist() == [1]
    _, tgt = TrainTransform(32)(_image(64, 64), _sample(64, 64, []), seed=0)
    assert tgt.boxes.shape == (0, 4) and tgt.labels.shape == (0,)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(64, scale_range=(1.5, 1.0))
    with pytest.raises(ValueError, match="hflip"):
        TrainTransform(64, hflip=2.0)
