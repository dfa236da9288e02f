"""A config's train/val split, read with its format's reader."""

from __future__ import annotations

from typing import Any

from ..config import Config
from .image_io import decode_image
from .readers import load_detection_set
from .sample import DetectionSet


def load_split(cfg: Config, split: str) -> DetectionSet:
    """``cfg.data.<split>`` (``"train"`` or ``"val"``) as a validated :class:`DetectionSet`."""
    src = getattr(cfg.data, split)
    kwargs: dict[str, Any] = {"strict": cfg.data.strict}
    if src.format == "coco":
        kwargs["images_dir"] = src.images
    elif src.format == "visdrone":
        kwargs["others"] = src.others or "ignore"
    else:
        if src.classes is not None:
            kwargs["classes"] = src.classes
        if src.format == "yolo":
            kwargs["split"] = src.split or split  # which key of a dataset.yaml
    dset = load_detection_set(src.format, src.path, **kwargs)
    if cfg.data.verify_images:
        verify_images(dset)
    return dset


def verify_images(dset: DetectionSet) -> None:
    """Decode every image of ``dset`` (a truncated JPEG's header reads fine; its pixels do not)."""
    for s in dset.samples:
        decode_image(s.path)
