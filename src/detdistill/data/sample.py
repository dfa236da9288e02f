"""The loaded, validated form of a detection dataset, independent of its file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detdistill.data.validation import LoadReport


@dataclass
class Sample:
    """One image and its boxes, as every reader returns it.

    Attributes:
        image_id: dataset-wide id (the COCO image id for COCO; the list position otherwise).
        path: the image file.
        width, height: image size in pixels (from the file header).
        boxes: ``(K, 4)`` float32 xyxy pixels, already clipped to the image.
        labels: ``(K,)`` int64 contiguous indices into ``DetectionSet.class_names``.
        iscrowd: ``(K,)`` bool; ``True`` for COCO ``iscrowd=1`` regions (and VOC
            ``difficult=1`` objects). They are kept for evaluation (ignore regions) but
            the training and evaluation :class:`~detdistill.structures.Target` omit them.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Normalise dtypes/shapes once so downstream code never special-cases K == 0.
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.iscrowd is None:
            self.iscrowd = np.zeros(len(self.labels), dtype=bool)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        if not len(self.boxes) == len(self.labels) == len(self.iscrowd):
            raise ValueError(
                f"{self.path}: boxes {self.boxes.shape}, labels {self.labels.shape} and "
                f"iscrowd {self.iscrowd.shape} disagree in length"
            )

    @property
    def num_boxes(self) -> int:
        return len(self.labels)


@dataclass
class DetectionSet:
    """A loaded dataset: samples plus the class vocabulary and what loading corrected.

    Attributes:
        samples: one :class:`Sample` per image, in file/list order.
        class_names: ``C`` names; a sample label ``k`` means ``class_names[k]``.
        category_ids: ``C`` original ids: COCO category ids, YOLO class ids, or ``1..C`` for
            VOC; ``category_ids[k]`` is the id of contiguous label ``k`` (for evaluation output).
        report: the :class:`LoadReport` of the reader.
        source: where it was loaded from (for messages only).
    """

    samples: list[Sample]
    class_names: list[str]
    category_ids: list[int]
    report: LoadReport
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(
                f"{self.source}: {len(self.class_names)} class names but {len(self.category_ids)} category ids"
            )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def by_file_name(self) -> dict[str, Sample]:
        """Samples keyed by image file name (to compare two exports of the same images)."""
        return {s.path.name: s for s in self.samples}

    def summary(self) -> str:
        """Multi-line description: sizes, corrections made while loading, boxes per class."""
        head = f"DetectionSet {self.source}" if self.source else "DetectionSet"
        lines = [f"{head}: {self.num_classes} classes", self.report.summary()]
        counts = [(n, c, self.report.per_class.get(n, 0)) for n, c in zip(self.class_names, self.category_ids)]
        lines.append("boxes per class: " + ", ".join(f"{n} ({c}): {k}" for n, c, k in counts if k))
        empty = [f"{n} ({c})" for n, c, k in counts if not k]
        if empty:
            shown = ", ".join(empty[:10]) + (f", ... ({len(empty) - 10} more)" if len(empty) > 10 else "")
            lines.append(f"{len(empty)} classes without boxes: {shown}")
        return "\n".join(lines)


#: One kept annotation as readers collect it: (clipped xyxy box, contiguous label, is crowd).
BoxRecord = tuple[np.ndarray, int, bool]


def make_sample(
    image_id: int,
    path: Path,
    width: int,
    height: int,
    records: list[BoxRecord],
    report: LoadReport,
    class_names: list[str],
    *,
    label_file_missing: bool = False,
) -> Sample:
    """Build a :class:`Sample` from collected boxes and update the report's counters."""
    if label_file_missing:
        report.background_missing += 1
    elif not records:
        report.background_empty += 1
    boxes = np.stack([r[0] for r in records]) if records else np.zeros((0, 4), np.float32)
    labels = np.array([r[1] for r in records], np.int64)
    crowd = np.array([r[2] for r in records], bool)
    report.images += 1
    report.boxes += len(records)
    report.crowd += int(crowd.sum())
    for k in labels[~crowd]:
        report.per_class[class_names[k]] += 1
    return Sample(image_id, path, width, height, boxes, labels, crowd)
