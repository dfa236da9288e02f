"""A config's train/val split, read with its format's reader."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..config import Config
from .image_io import decode_image
from .readers import load_detection_set
from .sample import DetectionSet, Sample
from .validation import LoadReport


def load_split(cfg: Config, split: str) -> DetectionSet:
    """``cfg.data.<split>`` (``"train"`` or ``"val"``) as a validated :class:`DetectionSet`.

    With ``data.tune_fraction > 0`` both come from ``data.train``: ``"val"`` is the carved
    tune split and ``"train"`` the rest (:func:`carve_tune_split`); ``data.val`` is not read,
    so tuning never sees the val images.
    """
    if cfg.data.tune_fraction > 0:
        rest, tune = carve_tune_split(_read(cfg, "train"), cfg.data.tune_fraction, cfg.data.tune_seed)
        return rest if split == "train" else tune
    return _read(cfg, split)


def carve_tune_split(dset: DetectionSet, fraction: float, seed: int = 0) -> tuple[DetectionSet, DetectionSet]:
    """``(rest, tune)``: ``round(fraction · N)`` images (at least 1) drawn without replacement by
    ``seed`` become the tune split. The draw depends only on the image paths, the fraction and the
    seed (not on file order), so every run of a sweep carves the same images."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.tune_fraction must be in (0, 1), got {fraction}")
    n = len(dset.samples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"data.tune_fraction={fraction} of {n} training images leaves none to train on")
    order = sorted(range(n), key=lambda i: str(dset.samples[i].path))
    picked = {order[i] for i in np.random.default_rng(seed).permutation(n)[:k].tolist()}
    tune = [s for i, s in enumerate(dset.samples) if i in picked]
    rest = [s for i, s in enumerate(dset.samples) if i not in picked]
    what = f"{k} of the {n} images of {dset.source}, tune_seed {seed}"
    return (_subset(dset, rest, f"{dset.source} minus the tune split ({what})"),
            _subset(dset, tune, f"tune split carved from train ({what})"))


def _subset(dset: DetectionSet, samples: list[Sample], source: str) -> DetectionSet:
    """The samples as a set of their own; the report counts them again (load-time corrections
    such as clipping were counted over the whole source and are not split)."""
    report = LoadReport(images=len(samples), boxes=sum(s.num_boxes for s in samples),
                        crowd=int(sum(s.iscrowd.sum() for s in samples)),
                        background_empty=sum(1 for s in samples if s.num_boxes == 0),
                        per_class=Counter(dset.class_names[int(label)] for s in samples
                                          for label, crowd in zip(s.labels, s.iscrowd) if not crowd and label >= 0),
                        notes=[f"a subset of {dset.source}; corrections made while loading are reported for the whole set"])
    return DetectionSet(samples, list(dset.class_names), list(dset.category_ids), report, source)


def _read(cfg: Config, split: str) -> DetectionSet:
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
