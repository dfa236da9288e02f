"""COCO-style bbox evaluation built from in-memory ground truth.

The evaluator is deliberately independent of any dataset format: callers feed it
ground truth (xyxy pixels, contiguous labels) and :class:`~detdistill.structures.Detections`
image by image, and it builds the pycocotools ``COCO`` objects in memory at
:meth:`CocoEvaluator.compute` time. This lets the same code score COCO, VOC-like or
synthetic data, and makes DDP gathering a matter of merging two dicts.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from detdistill.structures import ANY_CLASS, Detections

__all__ = ["CocoEvaluator", "EvalResult", "ANY_CLASS"]

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray | Sequence[Any]

# Scalar metrics in display / as_dict order.
_SCALAR_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


@dataclass
class EvalResult:
    """Outcome of one COCO bbox evaluation. All metrics are percentages (0-100).

    ``nan`` means "undefined" (e.g. ``APs`` when the ground truth has no small objects,
    or a class with no ground-truth instances); it is rendered as ``—``.

    Attributes:
        AP: mAP averaged over IoU 0.50:0.95, all areas, ``max_dets`` detections.
        AP50: mAP at IoU 0.50.
        AP75: mAP at IoU 0.75.
        APs: mAP on small objects (area < 32²).
        APm: mAP on medium objects (32² ≤ area < 96²).
        APl: mAP on large objects (area ≥ 96²).
        AR100: mean recall over IoU 0.50:0.95 with ``max_dets`` detections per image.
        per_class_AP: class name -> AP (IoU 0.50:0.95, all areas).
        num_images: images that had ground truth registered.
        num_detections: detections scored.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR100: float
    per_class_AP: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0

    def as_dict(self) -> dict[str, float]:
        """Flat mapping for ``metrics.jsonl``: ``AP``, ``AP50``, ..., ``AP/<class>``, counts."""
        out: dict[str, float] = {k: getattr(self, k) for k in _SCALAR_KEYS}
        out.update({f"AP/{name}": ap for name, ap in self.per_class_AP.items()})
        out["num_images"] = self.num_images
        out["num_detections"] = self.num_detections
        return out

    def summary(self) -> str:
        """Human-readable multi-line summary (our replacement for pycocotools' prints)."""
        # Local import: report.tables is pure Python, but keep engine importable on its own.
        from detdistill.report.tables import format_metrics_table

        head = format_metrics_table(
            [{k: getattr(self, k) for k in _SCALAR_KEYS}],
            list(_SCALAR_KEYS),
            title=f"COCO bbox: {self.num_images} images, {self.num_detections} detections",
        )
        if not self.per_class_AP:
            return head
        rows = [{"class": name, "AP": ap} for name, ap in self.per_class_AP.items()]
        return head + "\n" + format_metrics_table(rows, ["class", "AP"], title="per-class AP")

    def __str__(self) -> str:
        return self.summary()


def _to_numpy(x: ArrayLike | None, dtype: Any) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _mean_valid(a: np.ndarray) -> float:
    """pycocotools' convention: average the entries > -1; none left -> undefined (nan)."""
    valid = a[a > -1]
    return float(np.mean(valid)) * 100.0 if valid.size else float("nan")


class CocoEvaluator:
    """Accumulates ground truth and detections per image, scores them with pycocotools.

    State is keyed by ``image_id``: registering the same image twice replaces the
    earlier entry. That makes the duplicates introduced by ``DistributedSampler``
    padding harmless after :meth:`gather`.

    Args:
        class_names: one name per contiguous label ``0..C-1``.
        category_ids: the COCO category id of each contiguous label (default ``1..C``);
            only affects the ids inside the in-memory COCO dataset.
        max_dets: detections per image (per class, as in pycocotools) kept for
            AP / AR; ``params.maxDets`` becomes ``[1, 10, max_dets]`` (sorted, deduplicated).
    """

    def __init__(self, class_names: list[str], category_ids: list[int] | None = None, max_dets: int = 100) -> None:
        if category_ids is None:
            category_ids = list(range(1, len(class_names) + 1))
        if len(category_ids) != len(class_names):
            raise ValueError(f"{len(category_ids)} category_ids for {len(class_names)} class_names")
        if len(set(category_ids)) != len(category_ids):
            raise ValueError(f"category_ids must be unique, got {category_ids}")
        if max_dets < 1:
            raise ValueError(f"max_dets must be >= 1, got {max_dets}")
        self.class_names = list(class_names)
        self.category_ids = [int(c) for c in category_ids]
        self.max_dets = int(max_dets)
        # image_id -> (width, height, boxes (K,4) xyxy, labels (K,), iscrowd (K,), areas (K,))
        self._gt: dict[int, tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        # image_id -> (boxes (D,4) xyxy, scores (D,), labels (D,))
        self._dt: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ accumulation
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        """Forget all accumulated ground truth and detections."""
        self._gt.clear()
        self._dt.clear()

    def __len__(self) -> int:
        return len(self._gt)

    def _check_labels(self, labels: np.ndarray, what: str) -> None:
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{what} labels must be in [0, {self.num_classes}), got {np.unique(labels).tolist()}")

    def add_ground_truth(
        self,
        image_id: int,
        width: int,
        height: int,
        boxes: ArrayLike,
        labels: ArrayLike,
        iscrowd: ArrayLike | None = None,
        areas: ArrayLike | None = None,
    ) -> None:
        """Register the ground truth of one image (call it even when the image has no boxes).

        Args:
            image_id: dataset-wide image id.
            width, height: image size in pixels (stored in the COCO ``images`` entry).
            boxes: ``(K, 4)`` xyxy pixels.
            labels: ``(K,)`` contiguous class indices.
            iscrowd: optional ``(K,)`` bool; crowd boxes are "ignore" regions of their class, or
                of every class when their label is :data:`ANY_CLASS` (VisDrone's ignored regions).
            areas: optional ``(K,)`` object areas used for the small/medium/large split
                (e.g. COCO's segmentation areas); default is the box area.
        """
        b = _to_numpy(boxes, np.float64).reshape(-1, 4)
        lab = _to_numpy(labels, np.int64).reshape(-1)
        if len(b) != len(lab):
            raise ValueError(f"image {image_id}: {len(b)} boxes but {len(lab)} labels")
        crowd = np.zeros(len(b), bool) if iscrowd is None else _to_numpy(iscrowd, bool).reshape(-1)
        if len(crowd) == len(lab):  # a crowd region of label ANY_CLASS ignores detections of every class
            self._check_labels(lab[~(crowd & (lab == ANY_CLASS))], f"image {image_id} ground-truth")
        if areas is None:
            area = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
        else:
            area = _to_numpy(areas, np.float64).reshape(-1)
        if len(crowd) != len(b) or len(area) != len(b):
            raise ValueError(f"image {image_id}: iscrowd/areas length does not match {len(b)} boxes")
        self._gt[int(image_id)] = (int(width), int(height), b, lab, crowd, area)

    def add_detections(self, image_id: int, detections: Detections) -> None:
        """Register the detections of one image (replaces earlier ones for this id).

        An image with ground truth but no call here simply counts as having zero detections.
        """
        b = _to_numpy(detections.boxes, np.float64).reshape(-1, 4)
        s = _to_numpy(detections.scores, np.float64).reshape(-1)
        lab = _to_numpy(detections.labels, np.int64).reshape(-1)
        if not (len(b) == len(s) == len(lab)):
            raise ValueError(f"image {image_id}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        self._check_labels(lab, f"image {image_id} detection")
        self._dt[int(image_id)] = (b, s, lab)

    # ------------------------------------------------------------------ distributed
    def merge(self, other: "CocoEvaluator") -> None:
        """Fold another evaluator's state into this one (same classes required)."""
        if other.class_names != self.class_names or other.category_ids != self.category_ids:
            raise ValueError("cannot merge evaluators with different classes")
        self._gt.update(other._gt)
        self._dt.update(other._dt)

    def gather(self) -> None:
        """Merge the state of all DDP ranks into every rank; a no-op without ``torch.distributed``.

        Every rank ends up with the full state, so :meth:`compute` may run on any (or all).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        states: list[Any] = [None] * world
        # Plain numpy dicts pickle cheaply and are device-agnostic (works for gloo and nccl).
        torch.distributed.all_gather_object(states, (self._gt, self._dt))
        gt: dict = {}
        dt: dict = {}
        for g, d in states:
            gt.update(g)
            dt.update(d)
        self._gt, self._dt = gt, dt

    # ------------------------------------------------------------------ evaluation
    def _coco_dicts(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        images, anns = [], []
        for img_id in sorted(self._gt):
            w, h, boxes, labels, crowd, area = self._gt[img_id]
            images.append({"id": img_id, "width": w, "height": h})
            for box, lab, c, a in zip(boxes, labels, crowd, area):
                x1, y1, x2, y2 = (float(v) for v in box)
                # COCO matches crowd regions per category: an any-class region is one per category
                for cid in (self.category_ids if c and lab == ANY_CLASS else [self.category_ids[lab]]):
                    anns.append(
                        {
                            "id": len(anns) + 1,  # pycocotools treats id 0 as "unmatched"
                            "image_id": img_id,
                            "category_id": cid,
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": float(a),
                            "iscrowd": int(c),
                        }
                    )
        cats = [{"id": cid, "name": n} for cid, n in zip(self.category_ids, self.class_names)]
        gt = {"info": {}, "images": images, "annotations": anns, "categories": cats}

        unknown = set(self._dt) - set(self._gt)
        if unknown:
            raise ValueError(
                f"detections for {len(unknown)} image(s) without ground truth, e.g. {sorted(unknown)[:5]}; "
                "call add_ground_truth for every evaluated image (and gather() under DDP)"
            )
        results = []
        for img_id in sorted(self._dt):
            boxes, scores, labels = self._dt[img_id]
            for box, s, lab in zip(boxes, scores, labels):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append(
                    {
                        "image_id": img_id,
                        "category_id": self.category_ids[lab],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(s),
                    }
                )
        return gt, results

    def compute(self) -> EvalResult:
        """Run COCOeval('bbox') over everything accumulated and return the metrics.

        Logs our own summary at INFO level; pycocotools' prints are swallowed.
        """
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt_dict, results = self._coco_dicts()
        n_dets = len(results)
        if not gt_dict["images"]:
            raise ValueError("no ground truth registered: nothing to evaluate")

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt_dict
            coco_gt.createIndex()
            if results:
                coco_dt = coco_gt.loadRes(results)
            else:
                # loadRes indexes results[0]; an empty result set is a COCO with no annotations.
                coco_dt = COCO()
                coco_dt.dataset = {
                    "info": {},
                    "images": list(gt_dict["images"]),
                    "annotations": [],
                    "categories": list(gt_dict["categories"]),
                }
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
            # COCOeval sorts maxDets, so dedupe here and look max_dets up by value below.
            ev.params.maxDets = sorted({1, 10, self.max_dets})
            ev.evaluate()
            ev.accumulate()

        p = ev.params
        prec = ev.eval["precision"]  # (T iou, R recall thr, K cls, A area, M maxdets)
        rec = ev.eval["recall"]  # (T, K, A, M)
        area_idx = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
        iou50 = np.flatnonzero(np.isclose(p.iouThrs, 0.5))
        iou75 = np.flatnonzero(np.isclose(p.iouThrs, 0.75))
        all_a, m_idx = area_idx["all"], list(p.maxDets).index(self.max_dets)

        per_class = {}
        # p.catIds is sorted; map back to our contiguous order via the category id.
        k_of_cat = {cid: k for k, cid in enumerate(p.catIds)}
        for name, cid in zip(self.class_names, self.category_ids):
            per_class[name] = _mean_valid(prec[:, :, k_of_cat[cid], all_a, m_idx])

        result = EvalResult(
            AP=_mean_valid(prec[:, :, :, all_a, m_idx]),
            AP50=_mean_valid(prec[iou50, :, :, all_a, m_idx]),
            AP75=_mean_valid(prec[iou75, :, :, all_a, m_idx]),
            APs=_mean_valid(prec[:, :, :, area_idx["small"], m_idx]),
            APm=_mean_valid(prec[:, :, :, area_idx["medium"], m_idx]),
            APl=_mean_valid(prec[:, :, :, area_idx["large"], m_idx]),
            AR100=_mean_valid(rec[:, :, all_a, m_idx]),
            per_class_AP=per_class,
            num_images=len(gt_dict["images"]),
            num_detections=n_dets,
        )
        if log.isEnabledFor(logging.INFO):
            log.info("\n%s", result.summary())
        return result
