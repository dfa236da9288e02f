"""The three annotation formats on an in-repo fixture, against boxes written by hand.

``tests/fixtures/formats`` holds two tiny non-square images (48x24 and 20x40 px) with the same
three boxes in YOLO (``labels/*.txt``, ``list.txt``, ``dataset.yaml``), COCO (``coco.json``,
category ids 3 and 7) and VOC (``voc/Annotations/*.xml``). The boxes are tall and wide on
wide and tall images, so a swapped ``cx``/``cy`` or ``w``/``h``, or a width/height mix-up in
the normalisation, moves them. It needs nothing outside the repository, unlike the
``../shared`` fixtures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detdistill.data import DetectionSet, load_coco, load_voc, load_yolo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "formats"

#: file stem -> (width, height, [(class name, x0, y0, x1, y1)]) in pixels, written by hand
EXPECTED = {
    "wide": (48, 24, [("cat", 4, 2, 16, 20), ("dog", 30, 6, 46, 12)]),
    "tall": (20, 40, [("dog", 2, 5, 10, 35)]),
}


def _load(fmt: str) -> DetectionSet:
    if fmt == "yolo-list":
        return load_yolo(FIXTURE / "list.txt", classes=FIXTURE / "classes.txt")
    if fmt == "yolo-yaml":
        return load_yolo(FIXTURE / "dataset.yaml")
    if fmt == "yolo-folder":
        return load_yolo(FIXTURE / "images", classes=["cat", "dog"])
    if fmt == "coco":
        return load_coco(FIXTURE / "coco.json", FIXTURE / "images")
    return load_voc(FIXTURE / "voc", classes=["cat", "dog"])


@pytest.mark.parametrize("fmt", ["yolo-list", "yolo-yaml", "yolo-folder", "coco", "voc"])
def test_every_format_gives_the_hand_written_boxes(fmt: str) -> None:
    data = _load(fmt)
    assert data.class_names == ["cat", "dog"]
    samples = {Path(name).stem: s for name, s in data.by_file_name().items()}
    assert sorted(samples) == sorted(EXPECTED)
    for stem, (w, h, boxes) in EXPECTED.items():
        s = samples[stem]
        assert (s.width, s.height) == (w, h), stem
        got = sorted(zip((data.class_names[k] for k in s.labels), map(tuple, s.boxes.tolist())))
        want = sorted((name, tuple(map(float, b))) for name, *b in boxes)
        assert [g[0] for g in got] == [x[0] for x in want], f"{fmt} {stem}: labels"
        np.testing.assert_allclose(np.array([g[1] for g in got]), np.array([x[1] for x in want]), atol=1e-3,
                                   err_msg=f"{fmt} {stem}: boxes (xyxy px)")
    r = data.report
    assert (r.images, r.boxes, r.clipped, r.dropped, r.background) == (2, 3, 0, [], 0)


def test_coco_keeps_its_category_ids() -> None:
    data = load_coco(FIXTURE / "coco.json", FIXTURE / "images")
    assert data.category_ids == [3, 7]
    assert {s.image_id for s in data.samples} == {10, 20}


def test_verify_images_finds_a_truncated_jpeg_when_the_data_loads(tmp_path: Path) -> None:
    """A truncated JPEG has a readable header (the reader takes its size) but no pixels: only
    decoding finds it. With ``data.verify_images`` it fails at load, naming the file."""
    import shutil

    from PIL import Image

    from detdistill.config import config_from_dict
    from detdistill.data.splits import load_split

    root = tmp_path / "ds"
    shutil.copytree(FIXTURE / "images", root / "images")
    shutil.copytree(FIXTURE / "labels", root / "labels")
    Image.open(root / "images" / "wide.png").convert("RGB").resize((480, 240)).save(root / "images" / "wide.jpg")
    (root / "images" / "wide.png").unlink()
    data = (root / "images" / "wide.jpg").read_bytes()
    (root / "images" / "wide.jpg").write_bytes(data[: len(data) // 3])
    (root / "list.txt").write_text("images/wide.jpg\nimages/tall.png\n")
    src = {"format": "yolo", "path": str(root / "list.txt"), "classes": str(FIXTURE / "classes.txt")}
    cfg = config_from_dict({"data": {"train": src, "val": src}})
    assert len(load_split(cfg, "train").samples) == 2  # the header is fine: loads without verification
    cfg = config_from_dict({"data": {"train": src, "val": src, "verify_images": True}})
    with pytest.raises(ValueError, match=r"cannot decode image .*wide\.jpg.*data.verify_images"):
        load_split(cfg, "train")
