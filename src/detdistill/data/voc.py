"""Pascal VOC XML reader (one ``<annotation>`` file per image).

``path`` is a folder of ``.xml`` files (or a VOC root holding ``Annotations/``), or a list
file with one xml path a line (relative to the list file's folder).

The image of an xml is ``<filename>`` looked up next to the xml, then in a sibling
``JPEGImages/`` folder; when that exact name is absent, the same stem with any common image
suffix is tried (exports often keep a stale suffix: the voc-trees fixture names ``.tif``
files that ship as ``.png``); without ``<filename>`` the xml's own stem is used.

Coordinates are used as written (continuous pixel coordinates, no 1-based shift), so a
box stays identical to what annotation tools display. ``difficult=1`` objects are kept
with ``Sample.iscrowd=True`` (ignore regions, like COCO crowd boxes). Class names default
to the sorted set of names found; ``category_ids`` are ``1..C``.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from detdistill.data.sample import DetectionSet, make_sample
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
from detdistill.data.yolo import IMAGE_SUFFIXES, read_class_names


@dataclass
class _Node:
    """A minimal XML element that remembers its line (ElementTree does not)."""

    tag: str
    line: int
    text: str = ""
    children: list[_Node] = field(default_factory=list)

    def find(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[_Node]:
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str) -> str | None:
        node = self.find(tag)
        return node.text.strip() if node is not None else None


def _parse_xml(path: Path) -> _Node:
    parser = expat.ParserCreate()
    stack: list[_Node] = [_Node("#document", 0)]

    def start(tag: str, _attrs: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    try:
        parser.Parse(path.read_bytes(), True)
    except FileNotFoundError:
        raise AnnotationError(f"missing VOC annotation file {path}") from None
    except expat.ExpatError as e:
        raise AnnotationError(f"{location(path, e.lineno)}: malformed XML: {e}") from None
    root = stack[0].find("annotation")
    if root is None:
        raise AnnotationError(f"{path}: no <annotation> root element")
    return root


def _xml_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files and (path / "Annotations").is_dir():
            files = sorted((path / "Annotations").glob("*.xml"))
        if not files:
            raise AnnotationError(f"no .xml files in {path}")
        return files
    if path.is_file() and path.suffix.lower() == ".xml":
        return [path]
    if path.is_file():
        files = [Path(ln.strip()) for ln in read_lines(path) if ln.strip()]
        return [f if f.is_absolute() else path.parent / f for f in files]
    raise AnnotationError(f"VOC path {path} is neither a folder, an .xml file nor a list file")


def _find_image(xml_file: Path, filename: str | None) -> Path:
    folders = [xml_file.parent, xml_file.parent.parent / "JPEGImages"]
    if filename:
        for d in folders:
            if (d / filename).is_file():
                return d / filename
    # Same stem, another image suffix (stale <filename> suffix); the xml's stem without <filename>.
    stem = Path(filename).stem if filename else xml_file.stem
    for d in folders:
        for p in sorted(d.glob(f"{glob.escape(stem)}.*")) if d.is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return p
    # Nothing found: report the most likely intended path.
    return xml_file.parent / (filename or f"{xml_file.stem}.jpg")


def _objects(xml_file: Path) -> tuple[_Node, list[tuple[str, int, _Node]]]:
    root = _parse_xml(xml_file)
    objs = []
    for obj in root.findall("object"):
        name = obj.findtext("name")
        if not name:
            raise AnnotationError(f"{location(xml_file, obj.line)}: <object> without <name>")
        objs.append((name, obj.line, obj))
    return root, objs


def load_voc(
    path: str | Path,
    classes: Sequence[str] | str | Path | None = None,
    *,
    strict: bool = False,
    min_size: float = 1.0,
) -> DetectionSet:
    """Load Pascal VOC XML annotations.

    Args:
        path: a folder of ``.xml`` files, a VOC root with ``Annotations/``, or a list file.
        classes: class names (a list or a ``classes.txt`` path); default: sorted names found.
        strict: raise on degenerate boxes instead of dropping them.
        min_size: minimum box width/height in px after clipping.

    Returns:
        a :class:`DetectionSet`; ``Sample.image_id`` is the position in the sorted xml list.

    Raises:
        AnnotationError: malformed XML or ``<bndbox>``, unknown class names (with ``classes``),
            missing or unreadable images; messages name ``file.xml:line``.
    """
    path = Path(path)
    parsed = [(f, *_objects(f)) for f in _xml_files(path)]
    if classes is None:
        class_names = sorted({name for _, _, objs in parsed for name, _, _ in objs})
    elif isinstance(classes, (str, Path)):
        class_names = read_class_names(classes)
    else:
        class_names = [str(c) for c in classes]
    label_of = {n: k for k, n in enumerate(class_names)}

    report = LoadReport()
    samples = []
    for idx, (xml_file, root, objs) in enumerate(parsed):
        image = _find_image(xml_file, root.findtext("filename"))
        w, h = image_size(image, xml_file)
        records = []
        for name, line, obj in objs:
            loc = location(xml_file, line)
            check_class(name, class_names, loc)
            bb = obj.find("bndbox")
            if bb is None:
                raise AnnotationError(f"{loc}: malformed <object>: no <bndbox>")
            fields = [bb.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")]
            if any(f is None for f in fields):
                raise AnnotationError(f"{location(xml_file, bb.line)}: malformed <bndbox>: needs xmin ymin xmax ymax")
            box = parse_numbers(fields, location(xml_file, bb.line), "<bndbox>")
            kept = check_box(box, w, h, loc, report, strict=strict, min_size=min_size)
            if kept is not None:
                difficult = (obj.findtext("difficult") or "0") not in ("0", "")
                records.append((kept, label_of[name], difficult))
        samples.append(make_sample(idx, image, w, h, records, report, class_names))
    return DetectionSet(samples, class_names, list(range(1, len(class_names) + 1)), report, source=str(path))
