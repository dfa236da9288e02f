"""Readers on the real fixtures and the aerial-cars benchmark split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detdistill.data import AnnotationError, READERS, load_coco, load_detection_set, load_voc, load_yolo


def _sorted(boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0]))
    return boxes[order], labels[order]


def test_coco4_and_yolo4_load_identically(datasets_dir: Path) -> None:
    coco = load_coco(datasets_dir / "fixtures/coco4/ann_file.json")
    yolo = load_yolo(datasets_dir / "fixtures/yolo4/dataset.yaml")
    assert len(coco.class_names) == 80
    assert coco.class_names == yolo.class_names
    assert coco.category_ids == sorted(coco.category_ids) and coco.category_ids[:3] == [1, 2, 3]
    c, y = coco.by_file_name(), yolo.by_file_name()
    assert sorted(c) == sorted(y) and len(c) == 4
    for name in c:
        a, b = c[name], y[name]
        assert (a.width, a.height) == (b.width, b.height)
        keep = ~a.iscrowd  # the YOLO export has no crowd regions
        ab, al = _sorted(a.boxes[keep], a.labels[keep])
        bb, bl = _sorted(b.boxes, b.labels)
        assert ab.shape == bb.shape
        np.testing.assert_allclose(ab, bb, atol=1e-2)
        np.testing.assert_array_equal(al, bl)
        assert [coco.class_names[k] for k in al] == [yolo.class_names[k] for k in bl]


def test_coco4_crowd_box_is_kept_and_flagged(datasets_dir: Path) -> None:
    coco = load_coco(datasets_dir / "fixtures/coco4/ann_file.json")
    assert coco.report.boxes == 57 and coco.report.crowd == 1
    s = coco.by_file_name()["000000087038.jpg"]
    assert s.iscrowd.sum() == 1 and len(s.boxes) == 17
    assert coco.class_names[s.labels[s.iscrowd][0]] == "person"
    assert sum(coco.report.per_class.values()) == 56  # per-class counts exclude crowd
    assert s.image_id == 87038


def test_yolo4_gapped_names_resolution(datasets_dir: Path) -> None:
    yaml_file = datasets_dir / "fixtures/yolo4/dataset.yaml"
    yolo = load_yolo(yaml_file)
    # Label ids 25 and 44 are no keys of the gapped names dict: the ids are positions.
    assert yolo.category_ids == list(range(80))
    assert any("k-th name" in n for n in yolo.report.notes)
    with pytest.raises(AnnotationError, match=r"000000252219\.txt:\d+: unknown class 25; valid classes: 0, 1"):
        load_yolo(yaml_file, label_ids="keys")


def test_voc_trees(datasets_dir: Path) -> None:
    voc = load_voc(datasets_dir / "fixtures/voc-trees")
    assert voc.report.boxes == 98 and voc.report.images == 2
    assert voc.class_names == ["Alive", "Dead", "Tree"] and voc.category_ids == [1, 2, 3]
    assert dict(voc.report.per_class) == {"Tree": 61, "Alive": 9, "Dead": 28}
    assert all(s.path.suffix == ".png" for s in voc.samples)  # <filename> says .tif
    assert all((s.width, s.height) == (400, 400) for s in voc.samples)
    first = voc.samples[0]  # OSBS_029.xml: first object bndbox 203 67 227 90
    np.testing.assert_array_equal(first.boxes[0], [203, 67, 227, 90])


@pytest.mark.parametrize(
    ("split", "images", "counts"),
    [
        ("train", 93, {"car": 2597, "truck": 3, "bus": 72, "minibus": 76}),
        ("val", 29, {"car": 802, "truck": 2, "bus": 22, "minibus": 23}),
    ],
)
def test_aerial_cars_split_matches_readme(datasets_dir: Path, split: str, images: int, counts: dict) -> None:
    root = datasets_dir / "aerial-cars"
    ds = load_detection_set("yolo", root / f"{split}.txt", classes=root / "classes.txt")
    assert len(ds) == images == ds.report.images
    assert ds.report.boxes == sum(counts.values())
    assert dict(ds.report.per_class) == counts
    assert ds.class_names == ["car", "truck", "bus", "minibus", "cyclist"]
    assert ds.report.dropped == [] and ds.report.background == 0
    for s in ds.samples:  # boxes are clipped into their image
        assert (s.boxes[:, [0, 2]] <= s.width).all() and (s.boxes[:, [1, 3]] <= s.height).all()
        assert (s.boxes >= 0).all()
    assert "classes without boxes: cyclist" in ds.summary()


def test_registry_and_unknown_format(datasets_dir: Path) -> None:
    assert {"coco", "yolo", "voc", "visdrone"} <= set(READERS.names())
    with pytest.raises(KeyError, match="valid names: coco, visdrone, voc, yolo"):
        load_detection_set("kitti", datasets_dir)


def test_yolo_yaml_splits_dirs_and_lists(tmp_path: Path, write_image) -> None:
    for i, name in enumerate(["a", "b", "c"]):
        write_image(tmp_path / "data/images" / f"{name}.png", 40, 30, seed=i)
        (tmp_path / "data/labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data/labels" / f"{name}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data/val.txt").write_text("images/c.png\n")
    (tmp_path / "d.yaml").write_text("path: data\ntrain: [images]\nval: val.txt\nnames: [x, y]\n")
    train = load_yolo(tmp_path / "d.yaml")
    val = load_yolo(tmp_path / "d.yaml", split="val")
    assert len(train) == 3 and len(val) == 1 and val.samples[0].path.name == "c.png"
    assert train.class_names == ["x", "y"] and train.category_ids == [0, 1]
    np.testing.assert_allclose(val.samples[0].boxes, [[10, 7.5, 30, 22.5]])
    with pytest.raises(AnnotationError, match=r"d\.yaml: key 'test' is missing or empty"):
        load_yolo(tmp_path / "d.yaml", split="test")
    # A plain images folder needs class names.
    with pytest.raises(AnnotationError, match="class names unknown"):
        load_yolo(tmp_path / "data/images")
    assert len(load_yolo(tmp_path / "data/images", classes=["x", "y"])) == 3


def test_summary_mentions_counts(datasets_dir: Path) -> None:
    text = load_coco(datasets_dir / "fixtures/coco4/ann_file.json").summary()
    assert "4 images, 57 boxes (1 crowd)" in text and "person (1): 18" in text
