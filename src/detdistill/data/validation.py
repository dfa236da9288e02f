"""Annotation checks shared by every reader, and the report they fill in.

Policy (identical for COCO, YOLO and VOC):

* a box partly outside the image is clipped to it and counted (``LoadReport.clipped``);
  moves below ``CLIP_TOL`` px are rounding noise of normalised formats and not counted;
* a box whose width or height is ``< min_size`` px *after* clipping is dropped and its
  ``file:line`` is listed in ``LoadReport.dropped`` (never silent); with ``strict=True``
  it raises :class:`AnnotationError` instead;
* an unknown class, a malformed line/record, and a missing or unreadable image raise
  :class:`AnnotationError` naming the file and line (or JSON key) at fault;
* an image without boxes (empty or missing label file) is a valid background image and
  is counted in ``LoadReport.background_empty`` / ``background_missing``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Clipping by less than this many pixels is not reported (YOLO's 6-decimal rounding
#: moves edges by < 0.005 px even on 4000 px images).
CLIP_TOL = 1e-2


class AnnotationError(ValueError):
    """A dataset annotation or image is unusable; the message names the file and line/key."""


@dataclass
class LoadReport:
    """What a reader saw and did; every correction it made is counted here.

    Attributes:
        images: number of images loaded.
        boxes: number of boxes kept (crowd boxes included).
        crowd: how many of the kept boxes are crowd / ignore regions.
        clipped: boxes that were partly outside their image and were clipped.
        dropped: ``"file:line"`` of every box dropped as degenerate after clipping.
        background_empty: images whose label file/record exists but holds no box.
        background_missing: images with no label file at all (YOLO only).
        per_class: kept non-crowd boxes per class name.
        notes: decisions a reader took that the user should know about (e.g. how an
            ambiguous YOLO names mapping was resolved).
    """

    images: int = 0
    boxes: int = 0
    crowd: int = 0
    clipped: int = 0
    dropped: list[str] = field(default_factory=list)
    background_empty: int = 0
    background_missing: int = 0
    per_class: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def background(self) -> int:
        """Images without any box (empty plus missing label files)."""
        return self.background_empty + self.background_missing

    def summary(self, max_locations: int = 10) -> str:
        """A few human-readable lines; lists up to ``max_locations`` dropped-box locations."""
        lines = [
            f"{self.images} images, {self.boxes} boxes ({self.crowd} crowd), "
            f"{self.background} background images ({self.background_empty} empty, "
            f"{self.background_missing} missing label files)",
            f"{self.clipped} boxes clipped to the image, {len(self.dropped)} degenerate boxes dropped",
        ]
        lines += [f"note: {n}" for n in self.notes]
        for loc in self.dropped[:max_locations]:
            lines.append(f"  dropped: {loc}")
        if len(self.dropped) > max_locations:
            lines.append(f"  ... and {len(self.dropped) - max_locations} more")
        return "\n".join(lines)


def location(file: str | Path, line: int | str | None = None) -> str:
    """``"file:line"`` (or just ``"file"``): the format every message and report entry uses."""
    return f"{file}:{line}" if line is not None else str(file)


def parse_numbers(fields: Sequence[str], loc: str, what: str) -> list[float]:
    """Parse finite floats; raises :class:`AnnotationError` naming ``loc`` otherwise."""
    try:
        values = [float(f) for f in fields]
    except (TypeError, ValueError):
        raise AnnotationError(f"{loc}: malformed {what}: non-numeric value in {list(fields)!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise AnnotationError(f"{loc}: malformed {what}: non-finite value in {list(fields)!r}")
    return values


def check_class(key: object, valid: Sequence[object], loc: str) -> None:
    """Raise an :class:`AnnotationError` naming ``loc`` and the valid ids if ``key`` is unknown."""
    if key not in valid:
        shown = ", ".join(map(str, valid))
        raise AnnotationError(f"{loc}: unknown class {key!r}; valid classes: {shown}")


def check_box(
    box: Sequence[float],
    width: int,
    height: int,
    loc: str,
    report: LoadReport,
    *,
    strict: bool = False,
    min_size: float = 1.0,
) -> np.ndarray | None:
    """Clip one xyxy pixel box to the image and decide whether to keep it.

    Args:
        box: ``(4,)`` xyxy in pixels.
        width, height: image size in pixels.
        loc: ``"file:line"`` used in the report and in error messages.
        report: updated in place (``clipped``, ``dropped``).
        strict: raise instead of dropping a degenerate box.
        min_size: a box narrower or shorter than this (px, after clipping) is degenerate.

    Returns:
        the clipped ``(4,)`` float32 box, or ``None`` when it was dropped.
    """
    raw = np.asarray(box, dtype=np.float64)
    clipped = raw.copy()
    clipped[[0, 2]] = raw[[0, 2]].clip(0.0, width)
    clipped[[1, 3]] = raw[[1, 3]].clip(0.0, height)
    bw, bh = clipped[2] - clipped[0], clipped[3] - clipped[1]
    if bw < min_size or bh < min_size:
        msg = (
            f"{loc}: degenerate box xyxy={[round(float(v), 2) for v in raw]} in a {width}x{height} image "
            f"(size after clipping {bw:.2f}x{bh:.2f} px < min_size {min_size})"
        )
        if strict:
            raise AnnotationError(msg)
        report.dropped.append(loc)
        return None
    if np.abs(clipped - raw).max() > CLIP_TOL:
        report.clipped += 1
    return clipped.astype(np.float32)


def image_size(path: Path, referenced_by: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image read from its header only (no full decode).

    Raises :class:`AnnotationError` naming the image and the annotation that referenced it
    when the file is missing or is not a readable image.
    """
    if not path.is_file():
        raise AnnotationError(f"missing image {path} (referenced by {referenced_by})")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise AnnotationError(f"unreadable image {path} (referenced by {referenced_by}): {e}") from None
    if w <= 0 or h <= 0:
        raise AnnotationError(f"image {path} has an empty size {w}x{h} (referenced by {referenced_by})")
    return int(w), int(h)


def read_lines(path: Path, referenced_by: str | Path | None = None) -> list[str]:
    """Lines of a UTF-8 text file (label, list or classes file), with a helpful error if missing."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        by = f" (referenced by {referenced_by})" if referenced_by is not None else ""
        raise AnnotationError(f"missing file {path}{by}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"unreadable file {path}: {e}") from None
