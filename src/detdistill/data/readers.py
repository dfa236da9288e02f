"""Format name -> reader function, so configs can say ``format: yolo``.

Every reader has the signature ``reader(path, ..., *, strict=False, min_size=1.0) -> DetectionSet``.
A new format registers with ``READERS.add("name", fn)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from detdistill.data.coco import load_coco
from detdistill.data.sample import DetectionSet
from detdistill.data.visdrone import load_visdrone
from detdistill.data.voc import load_voc
from detdistill.data.yolo import load_yolo
from detdistill.registry import Registry

READERS: Registry[Callable[..., DetectionSet]] = Registry("data format")
READERS.add("coco", load_coco)
READERS.add("yolo", load_yolo)
READERS.add("voc", load_voc)
READERS.add("visdrone", load_visdrone)


def load_detection_set(format: str, path: str | Path, **kwargs: Any) -> DetectionSet:
    """Load ``path`` with the reader registered as ``format`` (``coco``, ``yolo``, ``voc``, ...).

    ``kwargs`` go to the reader (e.g. ``classes=``, ``split=``, ``images_dir=``, ``strict=``).
    An unknown format raises ``KeyError`` listing the registered names.
    """
    return READERS.get(format)(path, **kwargs)
