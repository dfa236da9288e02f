"""Every bad-annotation case, on small datasets written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detdistill.data import AnnotationError, load_coco, load_voc, load_yolo


@pytest.fixture
def yolo_set(tmp_path: Path, write_image):
    """``make(labels: dict[name, str | None]) -> list file``: 100x100 images, YOLO labels
    (``None``: no label file), two classes ``a``/``b``."""

    def make(labels: dict[str, str | None]) -> Path:
        lines = []
        for i, (name, text) in enumerate(labels.items()):
            write_image(tmp_path / "images" / f"{name}.png", 100, 100, seed=i)
            if text is not None:
                (tmp_path / "labels").mkdir(exist_ok=True)
                (tmp_path / "labels" / f"{name}.txt").write_text(text)
            lines.append(f"images/{name}.png")
        (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
        return tmp_path / "list.txt"

    return make


# ---- YOLO -------------------------------------------------------------------------


def test_box_outside_image_is_clipped_and_counted(yolo_set) -> None:
    ds = load_yolo(yolo_set({"im": "0 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"}), classes=["a", "b"])
    np.testing.assert_allclose(ds.samples[0].boxes, [[85, 40, 100, 60], [40, 40, 60, 60]], atol=1e-4)
    assert ds.report.clipped == 1 and ds.report.boxes == 2 and ds.report.dropped == []
    assert dict(ds.report.per_class) == {"a": 1, "b": 1}


def test_degenerate_box_dropped_and_listed_or_strict_raises(yolo_set) -> None:
    # line 2: 0.1 px wide; line 3: entirely outside -> zero size after clipping.
    lst = yolo_set({"im": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.001 0.2\n1 1.5 0.5 0.2 0.2\n"})
    label = lst.parent / "labels" / "im.txt"
    ds = load_yolo(lst, classes=["a", "b"])
    assert ds.report.dropped == [f"{label}:2", f"{label}:3"]
    assert ds.report.boxes == 1 and len(ds.samples[0].boxes) == 1
    assert f"dropped: {label}:2" in ds.summary()
    with pytest.raises(AnnotationError, match=rf"{label}:2: degenerate box"):
        load_yolo(lst, classes=["a", "b"], strict=True)
    # min_size is configurable: a 3 px box survives min_size=1 but not min_size=5.
    small = yolo_set({"im": "0 0.5 0.5 0.03 0.2\n"})
    assert load_yolo(small, classes=["a", "b"]).report.boxes == 1
    assert load_yolo(small, classes=["a", "b"], min_size=5).report.dropped == [f"{label}:1"]


def test_unknown_class_id_names_file_line_and_valid_ids(yolo_set) -> None:
    lst = yolo_set({"im": "0 0.5 0.5 0.2 0.2\n\n7 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(AnnotationError, match=r"labels/im\.txt:3: unknown class 7; valid classes: 0, 1$"):
        load_yolo(lst, classes=["a", "b"])


@pytest.mark.parametrize(
    ("line", "why"),
    [("0 0.5 0.5 0.2", "expected 5 fields"), ("0 0.5 x 0.2 0.2", "non-numeric"), ("1.5 0.5 0.5 0.2 0.2", "not an integer")],
)
def test_malformed_line_names_file_and_line(yolo_set, line: str, why: str) -> None:
    lst = yolo_set({"im": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(AnnotationError, match=rf"labels/im\.txt:2: malformed .*{why}"):
        load_yolo(lst, classes=["a", "b"])


def test_missing_image_names_path_and_list_line(yolo_set) -> None:
    lst = yolo_set({"im": "0 0.5 0.5 0.2 0.2\n"})
    lst.write_text("images/im.png\nimages/gone.jpg\n")
    with pytest.raises(AnnotationError, match=rf"missing image .*images/gone\.jpg \(referenced by {lst}:2\)"):
        load_yolo(lst, classes=["a", "b"])


def test_corrupt_image_names_path(yolo_set) -> None:
    lst = yolo_set({"im": "0 0.5 0.5 0.2 0.2\n", "bad": ""})
    (lst.parent / "images" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(AnnotationError, match=r"unreadable image .*images/bad\.png \(referenced by .*list\.txt:2\)"):
        load_yolo(lst, classes=["a", "b"])


def test_empty_and_missing_label_files_are_background(yolo_set) -> None:
    ds = load_yolo(yolo_set({"boxes": "0 0.5 0.5 0.2 0.2\n", "empty": "", "blank": "\n\n", "none": None}), classes=["a", "b"])
    assert ds.report.images == 4 and ds.report.boxes == 1
    assert ds.report.background_empty == 2 and ds.report.background_missing == 1 and ds.report.background == 3
    assert [len(s.boxes) for s in ds.samples] == [1, 0, 0, 0]
    assert ds.samples[3].boxes.shape == (0, 4) and ds.samples[3].labels.dtype == np.int64


def test_classes_txt_blank_line_in_the_middle_is_an_error(yolo_set, tmp_path: Path) -> None:
    lst = yolo_set({"im": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "classes.txt").write_text("a\n\nb\n")
    with pytest.raises(AnnotationError, match=r"classes\.txt:2: empty class name"):
        load_yolo(lst, classes=tmp_path / "classes.txt")


def test_gapped_names_dict_keys_or_positions(yolo_set) -> None:
    names = {0: "a", 2: "b"}
    ds = load_yolo(yolo_set({"im": "2 0.5 0.5 0.2 0.2\n"}), classes=names)  # id 2 is a key
    assert ds.category_ids == [0, 2] and ds.samples[0].labels.tolist() == [1]
    lst = yolo_set({"im": "1 0.5 0.5 0.2 0.2\n"})  # id 1 is no key but a position
    ds = load_yolo(lst, classes=names)
    assert ds.category_ids == [0, 1] and ds.samples[0].labels.tolist() == [1] and ds.report.notes
    assert load_yolo(lst, classes=names, label_ids="index").samples[0].labels.tolist() == [1]
    with pytest.raises(AnnotationError, match=r"im\.txt:1: unknown class 1; valid classes: 0, 2"):
        load_yolo(lst, classes=names, label_ids="keys")


# ---- COCO -------------------------------------------------------------------------


def _coco(tmp_path: Path, write_image, anns: list[dict], images: list[dict] | None = None) -> Path:
    write_image(tmp_path / "x.jpg", 50, 40)
    data = {
        "images": images or [{"id": 7, "file_name": "x.jpg", "width": 50, "height": 40}],
        "annotations": anns,
        "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def test_coco_sorted_categories_clipping_and_degenerate(tmp_path: Path, write_image) -> None:
    f = _coco(tmp_path, write_image, [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [40, 30, 20, 20], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [10, 10, 0.5, 5], "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 1},
    ])
    ds = load_coco(f)
    assert ds.class_names == ["two", "five"] and ds.category_ids == [2, 5]
    s = ds.samples[0]
    np.testing.assert_allclose(s.boxes, [[40, 30, 50, 40], [0, 0, 10, 10]])
    np.testing.assert_array_equal(s.labels, [1, 0])
    np.testing.assert_array_equal(s.iscrowd, [False, True])
    assert ds.report.clipped == 1 and ds.report.dropped == [f"{f}:annotations[1] (id=2)"]
    with pytest.raises(AnnotationError, match=r"ann\.json:annotations\[1\] \(id=2\): degenerate"):
        load_coco(f, strict=True)


def test_coco_errors_name_file_and_key(tmp_path: Path, write_image) -> None:
    ok = {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 1, 5, 5]}
    f = _coco(tmp_path, write_image, [ok, {**ok, "id": 9, "category_id": 3}])
    with pytest.raises(AnnotationError, match=r"ann\.json:annotations\[1\] \(id=9\): unknown class 3; valid classes: 2, 5"):
        load_coco(f)
    f = _coco(tmp_path, write_image, [{**ok, "bbox": [1, 1, "w", 5]}])
    with pytest.raises(AnnotationError, match=r"annotations\[0\] \(id=1\): malformed 'bbox'"):
        load_coco(f)
    f = _coco(tmp_path, write_image, [{k: v for k, v in ok.items() if k != "bbox"}])
    with pytest.raises(AnnotationError, match=r"annotations\[0\] \(id=1\): missing key 'bbox'"):
        load_coco(f)
    f = _coco(tmp_path, write_image, [ok], images=[{"id": 7, "file_name": "nope.jpg", "width": 50, "height": 40}])
    with pytest.raises(AnnotationError, match=r"missing image .*nope\.jpg \(referenced by .*ann\.json:images\[0\]"):
        load_coco(f)
    f = _coco(tmp_path, write_image, [ok], images=[{"id": 7, "file_name": "x.jpg", "width": 60, "height": 40}])
    with pytest.raises(AnnotationError, match=r"images\[0\] \(id=7\): JSON says 60x40 but .*x\.jpg is 50x40"):
        load_coco(f)
    f = _coco(tmp_path, write_image, [])
    assert load_coco(f).report.background_empty == 1


# ---- VOC --------------------------------------------------------------------------


def _voc_xml(filename: str, objects: list[tuple[str, str]]) -> str:
    objs = "".join(
        f"  <object>\n    <name>{n}</name>\n    <difficult>0</difficult>\n    <bndbox>{b}</bndbox>\n  </object>\n"
        for n, b in objects
    )
    return f"<annotation>\n  <filename>{filename}</filename>\n{objs}</annotation>\n"


def _box(x0, y0, x1, y1) -> str:
    return f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"


def test_voc_jpegimages_lookup_clipping_and_errors(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "JPEGImages" / "p.jpg", 64, 48)
    ann = tmp_path / "Annotations"
    ann.mkdir()
    xml = ann / "p.xml"
    xml.write_text(_voc_xml("p.jpg", [("cat", _box(10, 10, 70, 20)), ("dog", _box(5, 5, 5.5, 9))]))
    ds = load_voc(tmp_path)  # a VOC root: Annotations/ + JPEGImages/
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [1, 2]
    np.testing.assert_allclose(ds.samples[0].boxes, [[10, 10, 64, 20]])
    assert ds.report.clipped == 1 and ds.report.dropped == [f"{xml}:8"]  # the 2nd <object> starts on line 8
    with pytest.raises(AnnotationError, match=rf"{xml}:8: degenerate"):
        load_voc(ann, strict=True)
    with pytest.raises(AnnotationError, match=rf"{xml}:8: unknown class 'dog'; valid classes: cat"):
        load_voc(ann, classes=["cat"])
    xml.write_text(_voc_xml("p.jpg", [("cat", "<xmin>1</xmin><ymin>oops</ymin><xmax>4</xmax><ymax>4</ymax>")]))
    with pytest.raises(AnnotationError, match=rf"{xml}:6: malformed <bndbox>: non-numeric"):
        load_voc(ann)
    xml.write_text(_voc_xml("q.jpg", []))
    with pytest.raises(AnnotationError, match=rf"missing image .*q\.jpg \(referenced by {xml}\)"):
        load_voc(ann)
    xml.write_text("<annotation><filename>p.jpg</filename>")
    with pytest.raises(AnnotationError, match=rf"{xml}:1: malformed XML"):
        load_voc(ann)
