"""COCO JSON reader (``images`` / ``annotations`` / ``categories``; only ``bbox`` is used).

Labels: categories sorted by id become contiguous labels ``0..C-1``; the COCO ids are kept in
``DetectionSet.category_ids``. Crowd annotations (``iscrowd=1``) are kept with
``Sample.iscrowd=True``: COCO evaluation needs them as ignore regions, while training targets
drop them (as the torchvision references do, and as COCO-to-YOLO converters do, which is why a
YOLO export of the same images has one box fewer per crowd region).
"""

from __future__ import annotations

import json
from pathlib import Path

from detdistill.data.sample import BoxRecord, DetectionSet, make_sample
from detdistill.data.validation import (
    AnnotationError,
    LoadReport,
    check_box,
    check_class,
    image_size,
    parse_numbers,
)


def _get(record: dict, key: str, loc: str) -> object:
    if not isinstance(record, dict) or key not in record:
        raise AnnotationError(f"{loc}: missing key {key!r}")
    return record[key]


def load_coco(
    ann_file: str | Path,
    images_dir: str | Path | None = None,
    *,
    strict: bool = False,
    min_size: float = 1.0,
) -> DetectionSet:
    """Load a COCO detection annotation file.

    Args:
        ann_file: the JSON file.
        images_dir: folder holding ``file_name`` of every image; default: the JSON's folder.
        strict: raise on degenerate boxes instead of dropping them.
        min_size: minimum box width/height in px after clipping.

    Returns:
        a :class:`DetectionSet`; ``Sample.image_id`` is the COCO image id.

    Raises:
        AnnotationError: malformed JSON/records, unknown image or category ids, duplicate ids,
            missing or unreadable images, an image size disagreeing with the JSON.
    """
    ann_file = Path(ann_file)
    root = Path(images_dir) if images_dir is not None else ann_file.parent
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"missing COCO annotation file {ann_file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{ann_file}: not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{ann_file}: missing or non-list key {key!r}")

    # Categories sorted by id -> contiguous labels (the usual COCO convention).
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        loc = f"{ann_file}:categories[{i}]"
        cid, name = _get(cat, "id", loc), _get(cat, "name", loc)
        if not isinstance(cid, int) or cid in cats:
            raise AnnotationError(f"{loc}: category id {cid!r} is not a unique integer")
        cats[cid] = str(name)
    category_ids = sorted(cats)
    class_names = [cats[c] for c in category_ids]
    label_of = {cid: k for k, cid in enumerate(category_ids)}

    report = LoadReport()
    images: dict[int, tuple[Path, int, int]] = {}
    order: list[int] = []
    for i, img in enumerate(data["images"]):
        loc = f"{ann_file}:images[{i}]"
        iid, fname = _get(img, "id", loc), _get(img, "file_name", loc)
        if not isinstance(iid, int) or iid in images:
            raise AnnotationError(f"{loc}: image id {iid!r} is not a unique integer")
        path = root / str(fname)
        w, h = image_size(path, f"{loc} (id={iid})")
        jw, jh = img.get("width"), img.get("height")
        # A disagreement means the boxes are in another frame (e.g. a rotated or resized copy).
        if jw is not None and jh is not None and (jw, jh) != (w, h):
            raise AnnotationError(f"{loc} (id={iid}): JSON says {jw}x{jh} but {path} is {w}x{h}")
        images[iid] = (path, w, h)
        order.append(iid)

    per_image: dict[int, list[BoxRecord]] = {iid: [] for iid in order}
    for i, ann in enumerate(data["annotations"]):
        loc = f"{ann_file}:annotations[{i}]"
        aid = ann.get("id") if isinstance(ann, dict) else None
        if aid is not None:
            loc += f" (id={aid})"
        iid = _get(ann, "image_id", loc)
        if iid not in images:
            raise AnnotationError(f"{loc}: unknown image_id {iid!r}")
        cid = _get(ann, "category_id", loc)
        check_class(cid, category_ids, loc)
        bbox = _get(ann, "bbox", loc)
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AnnotationError(f"{loc}: malformed 'bbox' {bbox!r}: expected [x, y, w, h]")
        x, y, bw, bh = parse_numbers(bbox, loc, "'bbox'")
        _, w, h = images[iid]
        box = check_box([x, y, x + bw, y + bh], w, h, loc, report, strict=strict, min_size=min_size)
        if box is not None:
            per_image[iid].append((box, label_of[cid], bool(ann.get("iscrowd", 0))))

    samples = [make_sample(iid, *images[iid], per_image[iid], report, class_names) for iid in order]
    return DetectionSet(samples, class_names, category_ids, report, source=str(ann_file))
