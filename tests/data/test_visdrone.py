"""The VisDrone-DET reader on an in-repo fixture written by hand (tests/fixtures/visdrone/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detdistill.data import AnnotationError
from detdistill.data.readers import load_detection_set
from detdistill.data.visdrone import VISDRONE_CLASSES, load_visdrone
from detdistill.engine.coco_eval import CocoEvaluator
from detdistill.structures import ANY_CLASS, Detections

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "visdrone"


def _rows(sample) -> list[tuple]:
    return sorted((tuple(b), int(k), bool(c)) for b, k, c in zip(sample.boxes.tolist(), sample.labels, sample.iscrowd))


def test_boxes_classes_and_ignored_regions():
    data = load_visdrone(FIXTURE)
    assert data.class_names == VISDRONE_CLASSES and data.category_ids == list(range(1, 11))
    s1, s2, s3 = data.samples
    car, pedestrian, bus = VISDRONE_CLASSES.index("car"), VISDRONE_CLASSES.index("pedestrian"), VISDRONE_CLASSES.index("bus")
    # ignored: category 0, score 0, and `others` by default; their label is never used
    assert _rows(s1) == sorted([((10.0, 20.0, 40.0, 36.0), car, False), ((60.0, 40.0, 72.0, 70.0), pedestrian, False),
                                ((100.0, 10.0, 140.0, 50.0), ANY_CLASS, True), ((5.0, 80.0, 25.0, 100.0), ANY_CLASS, True),
                                ((120.0, 70.0, 150.0, 90.0), ANY_CLASS, True)])
    assert _rows(s2) == [((30.0, 30.0, 70.0, 54.0), bus, False)]
    assert len(s3.boxes) == 0 and (s3.width, s3.height) == (160, 120)
    r = data.report
    assert (r.images, r.boxes, r.crowd, r.background_missing) == (3, 6, 3, 1)
    assert r.per_class["car"] == 1 and r.per_class["bus"] == 1


def test_others_modes():
    as_class = load_visdrone(FIXTURE, others="class")
    assert as_class.class_names[-1] == "others" and as_class.category_ids[-1] == 11
    assert ((5.0, 80.0, 25.0, 100.0), 10, False) in _rows(as_class.samples[0])
    dropped = load_visdrone(FIXTURE, others="drop")
    assert all(b != (5.0, 80.0, 25.0, 100.0) for b, _, _ in _rows(dropped.samples[0]))
    assert len(dropped.samples[0].boxes) == 4
    with pytest.raises(ValueError, match="others must be"):
        load_visdrone(FIXTURE, others="keep")


def test_format_errors_name_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((FIXTURE / "images" / "0000001.png").read_bytes())
    (tmp_path / "annotations" / "a.txt").write_text("1,2,3,4,1,4,0,0\n1,2,3,4,1,12,0,0\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:2: category '12' is not a VisDrone category"):
        load_visdrone(tmp_path)
    (tmp_path / "annotations" / "a.txt").write_text("1,2,3\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:1: malformed line"):
        load_visdrone(tmp_path)
    with pytest.raises(AnnotationError, match="needs the folders images/ and annotations/"):
        load_visdrone(tmp_path / "images")
    assert load_detection_set("visdrone", FIXTURE).class_names == VISDRONE_CLASSES


def test_detections_inside_ignored_regions_are_not_false_positives():
    """VisDrone's evaluation ignores detections in ignored regions: the COCO evaluator does the
    same through crowd boxes. A detection on the ignored region leaves AP unchanged; the same
    detection where nothing is annotated lowers it."""
    s = load_visdrone(FIXTURE).samples[0]
    gt_boxes = torch.tensor(s.boxes[~s.iscrowd])

    def ap(extra_box: list[float] | None) -> float:
        ev = CocoEvaluator(VISDRONE_CLASSES, list(range(1, 11)))
        ev.add_ground_truth(1, s.width, s.height, s.boxes, s.labels, s.iscrowd)
        boxes, scores, labels = gt_boxes.clone(), [0.5, 0.4], list(s.labels[~s.iscrowd])
        if extra_box is not None:  # a confident 'car' detection
            boxes = torch.cat([boxes, torch.tensor([extra_box])])
            scores, labels = scores + [0.9], labels + [VISDRONE_CLASSES.index("car")]
        ev.add_detections(1, Detections(boxes.float(), torch.tensor(scores), torch.tensor(np.array(labels))))
        return ev.compute().AP

    assert ap(None) == pytest.approx(100.0)
    assert ap([102.0, 12.0, 138.0, 48.0]) == pytest.approx(100.0)  # inside the ignored region
    assert ap([2.0, 2.0, 30.0, 14.0]) < 100.0  # an ordinary false positive


def test_visdrone_config_trains_and_evaluates(tiny_config, single_thread):
    from detdistill.engine.train import train

    src = {"format": "visdrone", "path": str(FIXTURE)}
    cfg = tiny_config(data={"train": src, "val": src, "crop_size": 96, "workers": 0}, train__steps=2)
    result = train(cfg, resume=False, progress=False, log=lambda _m: None)
    assert result.final is not None and result.final.num_images == 1  # eval.max_images=1
    assert set(result.final.per_class_AP) == set(VISDRONE_CLASSES)
