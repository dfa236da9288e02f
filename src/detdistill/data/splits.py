"""A config's train/val split, read with its format's reader."""

from __future__ import annotations

from typing import Any

from ..config import Config
from .readers import load_detection_set
from .sample import DetectionSet


def load_split(cfg: Config, split: str) -> DetectionSet:
    """``cfg.data.<split>`` (``"train"`` or ``"val"``) as a validated :class:`DetectionSet`."""
    src = getattr(cfg.data, split)
    kwargs: dict[str, Any] = {"strict": cfg.data.strict}
    if src.format == "coco":
        kwargs["images_dir"] = src.images
    else:
        if src.classes is not None:
            kwargs["classes"] = src.classes
        if src.format == "yolo":
            kwargs["split"] = src.split or split  # which key of a dataset.yaml
    return load_detection_set(src.format, src.path, **kwargs)
