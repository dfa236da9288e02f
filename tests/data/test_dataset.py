"""StepBatchSampler resume/sharding, datasets, collate and image decoding."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detdistill.data import (
    EvalDataset,
    StepBatchSampler,
    TrainDataset,
    TrainTransform,
    collate,
    decode_image,
    load_coco,
    load_yolo,
)
from detdistill.structures import Batch


def _steps(sampler: StepBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), n))


def test_resume_from_step_equals_tail_of_uninterrupted_stream() -> None:
    full = _steps(StepBatchSampler(7, 3, seed=11, world_size=2, rank=1), 30)  # G=6: batches span epochs
    for s in (1, 7, 17, 29):
        assert _steps(StepBatchSampler(7, 3, seed=11, start_step=s, world_size=2, rank=1), 30 - s) == full[s:]


def test_stream_is_concatenated_epoch_permutations() -> None:
    n, seed = 10, 5
    stream = [i for b in _steps(StepBatchSampler(n, 4, seed), 10) for i, _ in b]  # 40 = 4 epochs
    for e in range(4):
        expect = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        assert stream[e * n : (e + 1) * n] == expect


def test_ranks_partition_the_global_batch() -> None:
    single = _steps(StepBatchSampler(13, 8, seed=3), 12)  # one process, global batch 8
    r0 = _steps(StepBatchSampler(13, 4, seed=3, world_size=2, rank=0), 12)
    r1 = _steps(StepBatchSampler(13, 4, seed=3, world_size=2, rank=1), 12)
    for g, a, b in zip(single, r0, r1):
        assert a + b == g  # indices and augmentation seeds
    seeds = [s for b in single for _, s in b]
    assert len(set(seeds)) == len(seeds)  # per (step, position) seeds are distinct
    assert _steps(StepBatchSampler(13, 8, seed=4), 1) != single[:1]


def test_sampler_argument_checks() -> None:
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(10, 2, 0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="positive"):
        StepBatchSampler(0, 2, 0)


@pytest.fixture(scope="module")
def yolo4(datasets_dir: Path):
    return load_yolo(datasets_dir / "fixtures/yolo4/dataset.yaml")


def test_train_dataset_is_reproducible_and_workers_agree(yolo4) -> None:
    ds = TrainDataset(yolo4, TrainTransform(160))
    img_a, tgt_a = ds[(2, 1234)]
    img_b, tgt_b = ds[(2, 1234)]
    assert torch.equal(img_a, img_b) and torch.equal(tgt_a.boxes, tgt_b.boxes)
    assert tgt_a.image_id == yolo4.samples[2].image_id and tgt_a.path == yolo4.samples[2].path
    with pytest.raises(TypeError, match=r"\(index, seed\)"):
        ds[2]

    def run(workers: int) -> list[Batch]:
        sampler = StepBatchSampler(len(ds), 2, seed=0, start_step=5)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(itertools.islice(iter(loader), 3))

    main, workers = run(0), run(2)
    for a, b in zip(main, workers):
        assert len(a) == 2 and all(im.shape == (3, 160, 160) for im in a.images)
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
        assert all(torch.equal(x.boxes, y.boxes) and torch.equal(x.labels, y.labels) for x, y in zip(a.targets, b.targets))


def test_image_cache(yolo4) -> None:
    ds = TrainDataset(yolo4, TrainTransform(64), cache_images=True)
    assert ds.load_image(0) is ds.load_image(0)
    ds.preload()
    assert len(ds._cache) == len(yolo4)
    plain = TrainDataset(yolo4, TrainTransform(64))
    assert plain.load_image(0) is not plain.load_image(0)
    with pytest.raises(RuntimeError, match="cache_images"):
        plain.preload()


def test_eval_dataset_full_image_without_crowd(datasets_dir: Path) -> None:
    coco = load_coco(datasets_dir / "fixtures/coco4/ann_file.json")
    ds = EvalDataset(coco)
    i = [s.path.name for s in coco.samples].index("000000087038.jpg")
    img, tgt = ds[i]
    s = coco.samples[i]
    assert img.shape == (3, s.height, s.width) and img.dtype == torch.float32
    assert len(tgt.boxes) == 16 and tgt.image_id == 87038  # the crowd region is not a target
    torch.testing.assert_close(tgt.boxes, torch.from_numpy(s.boxes[~s.iscrowd]))
    batch = collate([ds[0], ds[i]])
    assert isinstance(batch, Batch) and len(batch) == 2


@pytest.mark.parametrize(("suffix", "mode"), [(".png", "L"), (".png", "RGBA"), (".jpg", "RGB"), (".tif", "RGB")])
def test_decode_image_modes(tmp_path: Path, write_image, suffix: str, mode: str) -> None:
    path = write_image(tmp_path / f"x{suffix}", 23, 17, mode=mode)
    img = decode_image(path)
    assert img.shape == (3, 17, 23) and img.dtype == torch.uint8
    if suffix == ".png":  # lossless: compare with PIL's RGB conversion
        ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(img, ref)


def test_decode_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing image"):
        decode_image(tmp_path / "none.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*bad\.jpg"):
        decode_image(tmp_path / "bad.jpg")
