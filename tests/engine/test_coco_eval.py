"""CocoEvaluator checked against hand-computed (numpy) COCO numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detdistill.engine.coco_eval import CocoEvaluator, EvalResult
from detdistill.structures import Detections

IOU_THRS = np.linspace(0.5, 0.95, 10)


# ----------------------------------------------------------------------------- references
def ref_ap(is_tp_sorted: list[bool], num_gt: int) -> float:
    """101-point interpolated AP (percent) of one class at one IoU threshold.

    ``is_tp_sorted``: detections already sorted by descending score. Precision at recall
    threshold r is the max precision over all operating points with recall >= r.
    """
    tp = np.cumsum(np.asarray(is_tp_sorted, dtype=float))
    fp = np.cumsum(1.0 - np.asarray(is_tp_sorted, dtype=float))
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    vals = []
    # Exact float comparison on purpose: pycocotools does the same (so e.g. recall 7/10
    # does not reach the threshold linspace(0, 1, 101)[70] == 0.7000000000000001).
    for r in np.linspace(0.0, 1.0, 101):
        ok = precision[recall >= r]
        vals.append(ok.max() if ok.size else 0.0)
    return 100.0 * float(np.mean(vals))


def ref_greedy_match(gts: dict, dts: dict, cls: int, thr: float) -> tuple[list[bool], int]:
    """COCO matching for one class/threshold (no crowd, all areas): detections in
    descending score order take the unmatched GT of their image with the highest IoU >= thr."""
    pool = [(s, img, b) for img, (bs, ss, ls) in dts.items() for b, s, l in zip(bs, ss, ls) if l == cls]
    pool.sort(key=lambda x: -x[0])
    used: set = set()
    flags = []
    for _, img, b in pool:
        best, best_j = thr, None
        for j, (g, l) in enumerate(zip(*gts[img])):
            if l != cls or (img, j) in used:
                continue
            iou = iou_xyxy(g, b)
            if iou >= best:
                best, best_j = iou, j
        if best_j is not None:
            used.add((img, best_j))
        flags.append(best_j is not None)
    num_gt = sum(int(l == cls) for _, ls in gts.values() for l in ls)
    return flags, num_gt


def iou_xyxy(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def dets(boxes, scores, labels) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


def gt(ev: CocoEvaluator, image_id: int, boxes, labels, **kw) -> None:
    ev.add_ground_truth(image_id, 640, 480, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        torch.tensor(labels, dtype=torch.int64), **kw)


SMALL = [10.0, 10.0, 40.0, 40.0]  # 30x30 = 900 < 32^2
MEDIUM = [100.0, 100.0, 150.0, 150.0]  # 50x50 = 2500 in [32^2, 96^2)
LARGE = [200.0, 200.0, 300.0, 300.0]  # 100x100 = 10000 >= 96^2


# ----------------------------------------------------------------------------- tests
def test_perfect_detections_all_sizes() -> None:
    ev = CocoEvaluator(["a", "b"])
    gt(ev, 1, [SMALL, MEDIUM], [0, 1])
    gt(ev, 2, [LARGE], [1])
    ev.add_detections(1, dets([SMALL, MEDIUM], [0.9, 0.8], [0, 1]))
    ev.add_detections(2, dets([LARGE], [0.7], [1]))
    r = ev.compute()
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert getattr(r, k) == pytest.approx(100.0), k
    assert r.per_class_AP == pytest.approx({"a": 100.0, "b": 100.0})
    assert (r.num_images, r.num_detections) == (2, 3)


def test_perfect_only_large_gives_nan_for_missing_sizes() -> None:
    ev = CocoEvaluator(["a"])
    gt(ev, 7, [LARGE], [0])
    ev.add_detections(7, dets([LARGE], [0.5], [0]))
    r = ev.compute()
    assert r.AP == pytest.approx(100.0) and r.APl == pytest.approx(100.0)
    assert math.isnan(r.APs) and math.isnan(r.APm)
    d = r.as_dict()
    assert math.isnan(d["APs"]) and d["AP/a"] == pytest.approx(100.0)
    assert "—" in r.summary()


def test_false_positive_above_true_positive_matches_hand_ap() -> None:
    # 2 GT; detections by score: FP (0.95, nowhere near a GT), TP (0.9, IoU 1).
    ev = CocoEvaluator(["a"])
    g1, g2 = [0.0, 0.0, 50.0, 50.0], [100.0, 100.0, 160.0, 160.0]
    gt(ev, 1, [g1, g2], [0, 0])
    ev.add_detections(1, dets([[300.0, 300.0, 350.0, 350.0], g1], [0.95, 0.9], [0, 0]))
    r = ev.compute()
    expected = ref_ap([False, True], num_gt=2)
    # By hand: recall 0.5 reached at precision 0.5 -> 51 of 101 thresholds at 0.5.
    assert expected == pytest.approx(100 * 51 * 0.5 / 101)
    # IoU is exactly 1, so every IoU threshold gives the same AP.
    assert r.AP == pytest.approx(expected)
    assert r.AP50 == pytest.approx(expected)
    assert r.AP75 == pytest.approx(expected)
    assert r.AR100 == pytest.approx(50.0)


@pytest.mark.parametrize(
    "g, d",
    [
        ([10.0, 10.0, 20.0, 20.0], [11.0, 10.0, 21.0, 20.0]),  # IoU 0.818: passes 0.75
        ([10.0, 10.0, 20.0, 20.0], [12.0, 10.0, 22.0, 20.0]),  # IoU 0.667: AP50 but not AP75
        ([10.0, 20.0, 30.0, 60.0], [10.0, 28.0, 30.0, 68.0]),  # non-square, y shift: 0.667
        ([10.0, 20.0, 30.0, 60.0], [10.0, 21.0, 30.0, 61.0]),  # IoU 39/41 = 0.951
    ],
)
def test_xyxy_conversion_via_iou_thresholds(g: list[float], d: list[float]) -> None:
    # If xyxy were mistaken for xywh the IoU (hence the AP) would differ.
    iou = iou_xyxy(g, d)
    ev = CocoEvaluator(["a"])
    gt(ev, 1, [g], [0])
    ev.add_detections(1, dets([d], [0.9], [0]))
    r = ev.compute()
    assert r.AP == pytest.approx(100.0 * np.mean(iou >= IOU_THRS))
    assert r.AP50 == pytest.approx(100.0)
    assert r.AP75 == pytest.approx(100.0 if iou >= 0.75 else 0.0)


def test_per_class_ap_and_absent_class() -> None:
    ev = CocoEvaluator(["car", "person", "bike"], category_ids=[3, 1, 2])  # unsorted ids on purpose
    gt(ev, 1, [SMALL, MEDIUM, LARGE], [0, 1, 1])
    ev.add_detections(
        1,
        dets(
            [SMALL, [400.0, 400.0, 450.0, 450.0], MEDIUM, [500.0, 10.0, 520.0, 30.0]],
            [0.8, 0.95, 0.9, 0.3],
            [0, 1, 1, 2],  # a "bike" detection although no bike exists in the GT
        ),
    )
    r = ev.compute()
    person = ref_ap([False, True], num_gt=2)
    assert r.per_class_AP["car"] == pytest.approx(100.0)
    assert r.per_class_AP["person"] == pytest.approx(person)
    assert math.isnan(r.per_class_AP["bike"])
    assert r.AP == pytest.approx((100.0 + person) / 2)  # nan class excluded from the mean
    d = r.as_dict()
    assert d["AP/person"] == pytest.approx(person) and math.isnan(d["AP/bike"])


def test_zero_detections_overall_and_per_image() -> None:
    ev = CocoEvaluator(["a"])
    gt(ev, 1, [SMALL, LARGE], [0, 0])
    gt(ev, 2, [MEDIUM], [0])
    r = ev.compute()  # no add_detections at all
    assert r.AP == 0.0 and r.AP50 == 0.0 and r.AR100 == 0.0 and r.num_detections == 0
    ev.add_detections(1, Detections.empty())
    assert ev.compute().AP == 0.0

    # one image detected perfectly, the other has none: recall tops at 2/3.
    ev.add_detections(1, dets([SMALL, LARGE], [0.9, 0.8], [0, 0]))
    ev.add_detections(2, Detections.empty())
    r = ev.compute()
    assert r.AP == pytest.approx(ref_ap([True, True], num_gt=3))
    assert r.AP == pytest.approx(100.0 * 67 / 101)


def test_images_without_any_objects() -> None:
    ev = CocoEvaluator(["a"])
    gt(ev, 1, [], [])
    ev.add_detections(1, dets([SMALL], [0.9], [0]))
    r = ev.compute()
    assert math.isnan(r.AP) and math.isnan(r.per_class_AP["a"])


def test_small_medium_large_split() -> None:
    ev = CocoEvaluator(["a"])
    gt(ev, 1, [SMALL, MEDIUM, LARGE], [0, 0, 0])
    ev.add_detections(1, dets([SMALL, LARGE], [0.9, 0.8], [0, 0]))  # medium missed
    r = ev.compute()
    assert r.APs == pytest.approx(100.0)
    assert r.APm == pytest.approx(0.0)
    assert r.APl == pytest.approx(100.0)
    assert r.AP == pytest.approx(ref_ap([True, True], num_gt=3))


def test_area_override_moves_box_to_small() -> None:
    ev = CocoEvaluator(["a"])
    gt(ev, 1, [LARGE], [0], areas=torch.tensor([500.0]))
    ev.add_detections(1, dets([LARGE], [0.9], [0]))
    r = ev.compute()
    assert r.APs == pytest.approx(100.0) and math.isnan(r.APl)


def test_crowd_regions_are_ignored() -> None:
    ev = CocoEvaluator(["a"])
    crowd = [300.0, 300.0, 400.0, 400.0]
    gt(ev, 1, [LARGE, crowd], [0, 0], iscrowd=torch.tensor([False, True]))
    # high-scoring detection inside the crowd region: neither TP nor FP.
    ev.add_detections(1, dets([[320.0, 320.0, 350.0, 350.0], LARGE], [0.99, 0.5], [0, 0]))
    assert ev.compute().AP == pytest.approx(100.0)


def test_max_dets_caps_detections() -> None:
    ev = CocoEvaluator(["a"], max_dets=1)
    gt(ev, 1, [SMALL, LARGE], [0, 0])
    ev.add_detections(1, dets([SMALL, LARGE], [0.9, 0.8], [0, 0]))
    r = ev.compute()
    assert r.AP == pytest.approx(ref_ap([True], num_gt=2))
    assert r.AR100 == pytest.approx(50.0)


def test_numpy_inputs_and_reregistration_replaces() -> None:
    ev = CocoEvaluator(["a"])
    ev.add_ground_truth(1, 640, 480, np.array([SMALL]), np.array([0]))
    ev.add_detections(1, dets([[500.0, 0.0, 510.0, 10.0]], [0.9], [0]))
    ev.add_detections(1, dets([SMALL], [0.9], [0]))  # replaces the miss
    ev.add_ground_truth(1, 640, 480, np.array([SMALL]), np.array([0]))  # duplicate id (DDP padding)
    r = ev.compute()
    assert r.AP == pytest.approx(100.0) and r.num_images == 1 and r.num_detections == 1


def test_input_validation() -> None:
    ev = CocoEvaluator(["a"])
    with pytest.raises(ValueError):
        gt(ev, 1, [SMALL], [1])  # label out of range
    with pytest.raises(ValueError):
        CocoEvaluator(["a", "b"], category_ids=[1])
    gt(ev, 1, [SMALL], [0])
    ev.add_detections(2, dets([SMALL], [0.9], [0]))  # image 2 has no ground truth
    with pytest.raises(ValueError, match="without ground truth"):
        ev.compute()


def _split_evaluators() -> tuple[CocoEvaluator, CocoEvaluator, CocoEvaluator]:
    full, r0, r1 = (CocoEvaluator(["a"]) for _ in range(3))
    for ev, ids in ((full, (1, 2, 3)), (r0, (1, 2)), (r1, (3,))):
        for i in ids:
            gt(ev, i, [SMALL, LARGE], [0, 0])
            ev.add_detections(i, dets([SMALL, [0.0, 0.0, 5.0, 5.0]], [0.9, 0.95 if i == 2 else 0.1], [0, 0]))
    return full, r0, r1


def test_merge_equals_single_evaluator() -> None:
    full, r0, r1 = _split_evaluators()
    r0.merge(r1)
    assert r0.compute().as_dict() == pytest.approx(full.compute().as_dict(), nan_ok=True)


def test_gather_noop_without_dist_and_merges_with_dist(monkeypatch: pytest.MonkeyPatch) -> None:
    full, r0, r1 = _split_evaluators()
    r0.gather()  # not initialised: no-op
    assert len(r0) == 2

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)

    def fake_all_gather_object(out: list, obj: object) -> None:  # rank 0's view of a 2-rank gather
        out[0], out[1] = obj, (r1._gt, r1._dt)

    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    r0.gather()
    assert len(r0) == 3
    assert r0.compute().as_dict() == pytest.approx(full.compute().as_dict(), nan_ok=True)


def test_eval_result_as_dict_flat() -> None:
    r = EvalResult(1.0, 2.0, 3.0, float("nan"), 5.0, 6.0, 7.0, {"car": 8.0}, 2, 9)
    assert r.as_dict() == pytest.approx(
        {"AP": 1.0, "AP50": 2.0, "AP75": 3.0, "APs": float("nan"), "APm": 5.0, "APl": 6.0, "AR100": 7.0,
         "AP/car": 8.0, "num_images": 2, "num_detections": 9},
        nan_ok=True,
    )


def test_random_scene_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    gts, dts = {}, {}
    ev = CocoEvaluator(["a", "b"])
    scores = iter(rng.permutation(1000) / 1000.0)  # distinct scores: no tie-break ambiguity
    for img in range(4):
        k = int(rng.integers(2, 6))
        xy = rng.uniform(0, 400, (k, 2))
        wh = rng.uniform(8, 150, (k, 2))
        g = np.concatenate([xy, xy + wh], 1).tolist()
        gl = rng.integers(0, 2, k).tolist()
        keep = rng.random(k) < 0.8
        jitter = rng.normal(0, 6, (k, 4))
        d = [list(np.add(b, j)) for b, j, m in zip(g, jitter, keep) if m]
        dl = [l for l, m in zip(gl, keep) if m]
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x, y = rng.uniform(0, 500, 2)
            d.append([x, y, x + 30, y + 40])
            dl.append(int(rng.integers(0, 2)))
        ds = [next(scores) for _ in d]
        gts[img], dts[img] = (g, gl), (d, ds, dl)
        gt(ev, img, g, gl)
        ev.add_detections(img, dets(d, ds, dl))
    r = ev.compute()

    per_cls = {c: [ref_ap(*ref_greedy_match(gts, dts, c, t)) for t in IOU_THRS] for c in (0, 1)}
    assert r.per_class_AP["a"] == pytest.approx(np.mean(per_cls[0]))
    assert r.per_class_AP["b"] == pytest.approx(np.mean(per_cls[1]))
    assert r.AP == pytest.approx(np.mean(per_cls[0] + per_cls[1]))
    assert r.AP50 == pytest.approx((per_cls[0][0] + per_cls[1][0]) / 2)
    assert r.AP75 == pytest.approx((per_cls[0][5] + per_cls[1][5]) / 2)
    assert 0.0 < r.AP < 100.0


def _pycocotools_buckets(area: float) -> set[str]:
    """The size buckets pycocotools itself puts a ground-truth area in (its own ``Params``;
    both ends inclusive, as in ``COCOeval.evaluateImg``)."""
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    return {lbl for lbl, (lo, hi) in zip(p.areaRngLbl, p.areaRng) if lbl != "all" and lo <= area <= hi}


# side lengths straddling 32 and 96 (areas 31^2 .. 97^2), and the exact boundaries
@pytest.mark.parametrize("side", [31.0, 32.0, 33.0, 47.0, 49.0, 95.0, 96.0, 97.0])
def test_size_bucket_of_a_box_matches_pycocotools_area_ranges(side: float) -> None:
    """A single, perfectly detected box scores 100 in exactly the buckets pycocotools'
    own area ranges give its area, and NaN (no ground truth) in the others."""
    ev = CocoEvaluator(["a"])
    box = [50.0, 60.0, 50.0 + side, 60.0 + side]
    gt(ev, 1, [box], [0])
    ev.add_detections(1, dets([box], [0.9], [0]))
    r = ev.compute()
    expected = _pycocotools_buckets(side * side)
    assert expected  # every area is in some bucket
    got = {"small": r.APs, "medium": r.APm, "large": r.APl}
    for bucket, value in got.items():
        if bucket in expected:
            assert value == pytest.approx(100.0), f"{side}x{side}: {bucket}"
        else:
            assert math.isnan(value), f"{side}x{side} must not count as {bucket} (got {value})"


def test_boxes_straddling_32_and_96_split_into_buckets() -> None:
    """31², 33², 95², 97² boxes; only the 31² and 97² ones are found. pycocotools' ranges
    (small < 32² < medium < 96² < large) then give APs 100, APm 0, APl 100. A boundary
    moved to 48² would make the missed 33² box small (APs 50)."""
    sides = {31.0: True, 33.0: False, 95.0: False, 97.0: True}
    boxes = [[10.0 + 120 * i, 20.0, 10.0 + 120 * i + s, 20.0 + s] for i, s in enumerate(sides)]
    ev = CocoEvaluator(["a"])
    ev.add_ground_truth(1, 640, 200, torch.tensor(boxes), torch.zeros(4, dtype=torch.int64))
    found = [b for b, hit in zip(boxes, sides.values()) if hit]
    ev.add_detections(1, dets(found, [0.9, 0.8], [0, 0]))
    r = ev.compute()
    assert (r.APs, r.APm, r.APl) == (pytest.approx(100.0), pytest.approx(0.0), pytest.approx(100.0))
    assert r.AP == pytest.approx(ref_ap([True, True], num_gt=4))
