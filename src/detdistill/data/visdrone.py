"""VisDrone-DET annotations: ``images/`` + ``annotations/``, one ``.txt`` per image.

Each line is ``x,y,w,h,score,category,truncation,occlusion`` (pixels, top-left corner). The
format's own rules, kept here:

- **Ignored regions** (``category 0``, or ``score 0``) are not ground truth. They become crowd
  boxes (``Sample.iscrowd``) of label :data:`~detdistill.structures.ANY_CLASS`, which COCO
  evaluation treats as VisDrone's toolkit does: a detection of any class inside one is
  neither a true nor a false positive. Training ignores crowd boxes.
- **``others``** (``category 11``) is ignored the same way by default; ``others="class"``
  keeps it as an 11th class, ``others="drop"`` removes the boxes altogether.
- Truncation and occlusion are read and validated but not used.

Classes are VisDrone's ten: pedestrian, people, bicycle, car, van, truck, tricycle,
awning-tricycle, bus, motor (category ids 1-10, kept as ``category_ids``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from detdistill.data.sample import BoxRecord, DetectionSet, make_sample
from detdistill.data.validation import (
    AnnotationError,
    LoadReport,
    check_box,
    image_size,
    location,
    parse_numbers,
    read_lines,
)
from detdistill.data.yolo import IMAGE_SUFFIXES
from detdistill.structures import ANY_CLASS

VISDRONE_CLASSES = ["pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus",
                    "motor"]
OthersMode = Literal["ignore", "class", "drop"]


def _root_folders(path: Path) -> tuple[Path, Path]:
    images, annotations = path / "images", path / "annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise AnnotationError(f"VisDrone path {path} needs the folders images/ and annotations/ "
                              f"(found: {', '.join(sorted(p.name for p in path.iterdir())) if path.is_dir() else 'nothing'})")
    return images, annotations


def load_visdrone(path: str | Path, *, others: OthersMode = "ignore", strict: bool = False,
                  min_size: float = 1.0) -> DetectionSet:
    """Load a VisDrone-DET split folder (e.g. ``VisDrone2019-DET-val``).

    Args:
        path: the folder holding ``images/`` and ``annotations/``.
        others: what category 11 (``others``) becomes: ``ignore`` (an ignored region, as the
            VisDrone toolkit scores it), ``class`` (an 11th class) or ``drop``.
        strict: raise on degenerate boxes instead of dropping them.
        min_size: minimum box width/height in px after clipping.

    Raises:
        AnnotationError: a malformed line (file:line), an unknown category, missing folders.
    """
    if others not in ("ignore", "class", "drop"):
        raise ValueError(f"others must be 'ignore', 'class' or 'drop', got {others!r}")
    path = Path(path)
    images, annotations = _root_folders(path)
    class_names = VISDRONE_CLASSES + (["others"] if others == "class" else [])
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AnnotationError(f"no images in {images}")
    report = LoadReport()
    samples = []
    for idx, image in enumerate(files):
        ann = annotations / f"{image.stem}.txt"
        w, h = image_size(image, ann)
        records: list[BoxRecord] = []
        if ann.is_file():
            for i, line in enumerate(read_lines(ann, image), 1):
                fields = [f for f in line.strip().split(",") if f.strip() != ""]  # some files end lines with ","
                if not fields:
                    continue
                loc = location(ann, i)
                if len(fields) < 6:
                    raise AnnotationError(f"{loc}: malformed line {line.strip()!r}: expected "
                                          "'x,y,w,h,score,category,truncation,occlusion'")
                x, y, bw, bh, score, category = parse_numbers(fields[:6], loc, "line")
                cat = int(category)
                if cat != category or not 0 <= cat <= 11:
                    raise AnnotationError(f"{loc}: category {fields[5]!r} is not a VisDrone category (0-11)")
                if cat == 11 and others == "drop":
                    continue
                ignored = cat == 0 or score == 0 or (cat == 11 and others == "ignore")
                label = ANY_CLASS if ignored else cat - 1  # ignored regions ignore detections of every class
                kept = check_box([x, y, x + bw, y + bh], w, h, loc, report, strict=strict, min_size=min_size)
                if kept is not None:
                    records.append((kept, label, ignored))
        samples.append(make_sample(idx, image, w, h, records, report, class_names, label_file_missing=not ann.is_file()))
    ids = list(range(1, len(class_names) + 1))  # VisDrone's own category ids (others = 11)
    return DetectionSet(samples, class_names, ids, report, source=str(path))
