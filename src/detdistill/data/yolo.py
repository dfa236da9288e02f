"""YOLO txt reader (ultralytics layout: ``class cx cy w h`` normalised, one file per image).

Where images come from (``path``):

* an ultralytics ``dataset.yaml``: keys ``path`` (root; relative to the yaml's folder, default
  that folder), ``train``/``val``/``test`` (a folder, a list ``.txt``, or a list of those,
  relative to the root) and ``names`` (a list, or an ``{id: name}`` dict whose ids may have gaps);
* a list ``.txt`` file: one image path a line, relative to the list file's folder;
* a folder of images (searched recursively).

Label files follow the ultralytics convention: the last ``images`` component of the image path
becomes ``labels`` and the suffix becomes ``.txt`` (no ``images`` component: next to the image).
A missing or empty label file means a background image (counted in the report).

Labels: YOLO ids sorted ascending become contiguous labels ``0..C-1``; the YOLO ids are kept in
``DetectionSet.category_ids``. So a names dict ``{0: person, ..., 10: fire hydrant, 12: stop sign}``
gives ``class_names`` in key order, identical to the COCO categories sorted by COCO id.

A names dict with gaps is ambiguous (ultralytics refuses it): are label ids the keys, or
positions in key order? ``load_yolo(label_ids=...)`` decides; ``"auto"`` looks at the ids the
label files use and records its decision in ``report.notes`` (see :func:`_resolve_ids`). The
``yolo4`` fixture is such a case: keys are COCO id - 1 but labels use the contiguous 80-class ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from detdistill.data.sample import BoxRecord, DetectionSet, make_sample
from detdistill.data.validation import (
    AnnotationError,
    LoadReport,
    check_box,
    check_class,
    image_size,
    location,
    parse_numbers,
    read_lines,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo"})

#: (image path, where it was referenced: "list.txt:LINE", the yaml key or the folder)
_ImageRef = tuple[Path, str]


def label_path_for(image: Path) -> Path:
    """The ultralytics label file of an image: last ``images`` dir -> ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):  # directories only, never the file name
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_class_names(path: str | Path) -> list[str]:
    """Names from a ``classes.txt`` (one a line; trailing blank lines ignored)."""
    path = Path(path)
    lines = [ln.strip() for ln in read_lines(path)]
    while lines and not lines[-1]:
        lines.pop()
    for i, name in enumerate(lines, 1):
        if not name:
            # A blank line in the middle would silently shift every later class id.
            raise AnnotationError(f"{location(path, i)}: empty class name")
    if not lines:
        raise AnnotationError(f"{path}: no class names")
    return lines


def _names_to_map(names: object, where: str) -> dict[int, str]:
    if isinstance(names, Mapping):
        out = {}
        for k, v in names.items():
            try:
                out[int(k)] = str(v)
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: class id {k!r} is not an integer") from None
        return out
    if isinstance(names, Sequence) and not isinstance(names, str):
        return {i: str(n) for i, n in enumerate(names)}
    raise AnnotationError(f"{where}: expected a list of names or an {{id: name}} mapping, got {names!r}")


def _images_in_dir(folder: Path, ref: str) -> list[_ImageRef]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise AnnotationError(f"no images found in {folder} ({ref})")
    return [(p, ref) for p in found]


def _images_in_list(list_file: Path) -> list[_ImageRef]:
    out = []
    for i, line in enumerate(read_lines(list_file), 1):
        line = line.strip()
        if line:
            p = Path(line)
            out.append((p if p.is_absolute() else list_file.parent / p, location(list_file, i)))
    if not out:
        raise AnnotationError(f"{list_file}: image list is empty")
    return out


def _images_from(entry: Path, ref: str) -> list[_ImageRef]:
    if entry.is_dir():
        return _images_in_dir(entry, ref)
    if entry.is_file():
        return _images_in_list(entry)
    if not entry.exists():
        raise AnnotationError(f"{ref}: not found: {entry} (expected an images folder or a list .txt)"
                              if str(entry) != ref else f"not found: {entry} (expected an images folder or a list .txt)")
    raise AnnotationError(f"{ref}: {entry} is neither an image folder nor a list file")


def _from_yaml(yaml_file: Path, split: str) -> tuple[list[_ImageRef], dict[int, str] | None]:
    try:
        data = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"missing dataset yaml {yaml_file}") from None
    except (OSError, yaml.YAMLError) as e:
        raise AnnotationError(f"{yaml_file}: unreadable yaml: {e}") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{yaml_file}: expected a mapping with keys path/train/val/names")
    root = Path(data.get("path") or ".")
    if not root.is_absolute():
        root = yaml_file.parent / root
    entries = data.get(split)
    if not entries:
        raise AnnotationError(f"{yaml_file}: key {split!r} is missing or empty")
    if isinstance(entries, (str, Path)):
        entries = [entries]
    images: list[_ImageRef] = []
    for e in entries:
        images += _images_from(root / str(e), f"{yaml_file}: key {split!r}")
    names = data.get("names")
    return images, (_names_to_map(names, f"{yaml_file}: key 'names'") if names is not None else None)


#: One parsed label line: ("file:line", YOLO class id, xyxy pixel box before clipping).
_RawBox = tuple[str, int, list[float]]


def _parse_label_file(label_file: Path, width: int, height: int) -> list[_RawBox]:
    out: list[_RawBox] = []
    for i, line in enumerate(read_lines(label_file), 1):
        fields = line.split()
        if not fields:
            continue
        loc = location(label_file, i)
        if len(fields) != 5:
            raise AnnotationError(
                f"{loc}: malformed line {line.strip()!r}: expected 5 fields 'class cx cy w h', got {len(fields)}"
                " (polygon/keypoint labels are not supported)"
            )
        k, cx, cy, w, h = parse_numbers(fields, loc, "line")
        if not k.is_integer() or k < 0:
            raise AnnotationError(
                f"{loc}: malformed line {line.strip()!r}: class id {fields[0]!r} is not an integer >= 0"
            )
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        out.append((loc, int(k), box))
    return out


def _resolve_ids(
    id_to_name: dict[int, str], used: list[_RawBox], mode: str, report: LoadReport
) -> tuple[list[int], str]:
    """Decide what a label-file id means; returns (``category_ids``: the label-file id of each
    contiguous label, the mode used).

    ``keys``: id ``k`` is ``names[k]`` (ids are the mapping's keys). ``index``: id ``k`` is the
    ``k``-th name in key order. Both agree when the keys are ``0..C-1``. For keys with gaps
    (``auto``) the label files decide: ids that are no key but a valid position mean ``index``
    (exporters that write COCO-style sparse keys next to contiguous 80-class label ids do this;
    ultralytics itself rejects such a yaml). Ambiguous or dense cases use ``keys``.
    """
    keys = sorted(id_to_name)
    if mode not in ("auto", "keys", "index"):
        raise ValueError(f"label_ids must be 'auto', 'keys' or 'index', got {mode!r}")
    if mode == "auto":
        mode = "keys"
        if keys != list(range(len(keys))):
            ids = {k for _, k, _ in used}
            not_keys = sorted(ids - set(keys))
            if not_keys and max(ids) < len(keys):
                mode = "index"
                report.notes.append(
                    f"class-name keys have gaps ({keys[0]}..{keys[-1]}, {len(keys)} names) but label ids "
                    f"{not_keys[:5]} are no keys while all ids are < {len(keys)}: label id k read as the "
                    "k-th name in key order (pass label_ids='keys' to refuse)"
                )
            elif not not_keys:
                report.notes.append("class-name keys have gaps; label id k read as names[k] (label_ids='keys')")
    return (keys if mode == "keys" else list(range(len(keys)))), mode


def load_yolo(
    path: str | Path,
    classes: Sequence[str] | Mapping[int, str] | str | Path | None = None,
    *,
    split: str = "train",
    strict: bool = False,
    min_size: float = 1.0,
    label_ids: str = "auto",
) -> DetectionSet:
    """Load a YOLO-format dataset.

    Args:
        path: a ``dataset.yaml``, a list ``.txt`` file, or a folder of images.
        classes: class names as a list (ids ``0..C-1``), an ``{id: name}`` mapping, or the path
            of a ``classes.txt``; overrides the yaml's ``names``; required without a yaml.
        split: the yaml key to read (``train``, ``val`` or ``test``); ignored otherwise.
        strict: raise on degenerate boxes instead of dropping them.
        min_size: minimum box width/height in px after clipping.
        label_ids: how label-file ids index a names mapping whose keys have gaps: ``"keys"``
            (id ``k`` is ``names[k]``), ``"index"`` (id ``k`` is the ``k``-th name in key order)
            or ``"auto"`` (decided from the ids found, the decision is written to
            ``report.notes``). Irrelevant for lists / ``classes.txt`` (keys ``0..C-1``).

    Returns:
        a :class:`DetectionSet`; ``Sample.image_id`` is the position in the image list;
        ``category_ids`` are the ids the label files use (sorted), ``class_names`` in that order.

    Raises:
        AnnotationError: missing/unknown yaml keys, malformed label lines, unknown class ids,
            missing or unreadable images.
    """
    path = Path(path)
    yaml_names: dict[int, str] | None = None
    if path.suffix.lower() in (".yaml", ".yml"):
        images, yaml_names = _from_yaml(path, split)
    else:
        images = _images_from(path, str(path))

    if classes is not None:
        if isinstance(classes, (str, Path)):
            id_to_name = dict(enumerate(read_class_names(classes)))
        else:
            id_to_name = _names_to_map(classes, "classes argument")
    elif yaml_names is not None:
        id_to_name = yaml_names
    else:
        raise AnnotationError(f"{path}: class names unknown; pass classes=[...] or classes='classes.txt'")

    # Pass 1: sizes and raw label lines (the id mapping may depend on the ids used).
    report = LoadReport()
    parsed: list[tuple[int, Path, int, int, list[_RawBox] | None]] = []
    for idx, (image, ref) in enumerate(images):
        w, h = image_size(image, ref)
        label_file = label_path_for(image)
        raw = _parse_label_file(label_file, w, h) if label_file.is_file() else None
        parsed.append((idx, image, w, h, raw))

    all_boxes = [b for *_, raw in parsed for b in (raw or [])]
    category_ids, _ = _resolve_ids(id_to_name, all_boxes, label_ids, report)
    class_names = [id_to_name[k] for k in sorted(id_to_name)]
    label_of = {cid: k for k, cid in enumerate(category_ids)}

    # Pass 2: class checks, clipping, degenerate boxes.
    samples = []
    for idx, image, w, h, raw in parsed:
        records: list[BoxRecord] = []
        for loc, k, box in raw or []:
            check_class(k, category_ids, loc)
            kept = check_box(box, w, h, loc, report, strict=strict, min_size=min_size)
            if kept is not None:
                records.append((kept, label_of[k], False))
        samples.append(make_sample(idx, image, w, h, records, report, class_names, label_file_missing=raw is None))
    return DetectionSet(samples, class_names, category_ids, report, source=str(path))
