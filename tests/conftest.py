"""Shared fixtures for the engine, adapter, config and CLI tests.

Everything here is sized for a loaded 2-core CPU: ResNet-18, FPN width 32, one head conv,
128 px crops, batch 2, a couple of images.

- ``repo_root`` / ``shared_datasets``: the project root and ``../shared/datasets`` beside it
  (``$DETDISTILL_DATASETS`` overrides the latter; a missing folder fails, never skips).
- ``tiny_config(**overrides)``: a :class:`~detdistill.config.Config` on a 2-image subset of the
  embedded quickstart sample (YOLO format), writing under ``tmp_path``; ``tiny_config_yaml``
  writes the same config as a YAML file (for the CLI).
- ``crop_dataset(n, size)``: a YOLO dataset of ``n`` ``size x size`` crops of sample images,
  each crop chosen to hold as many whole cars as possible (used where the whole image must
  be seen at native resolution: overfitting, fixed DDP batches, adapter smoke tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from detdistill.config import Config, config_from_dict
from detdistill.quickstart import sample_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("DETDISTILL_DATASETS") or REPO_ROOT.parent / "shared" / "datasets")

#: The two smallest sample images (684x547, ~25 cars each): cheap to decode and evaluate.
TINY_IMAGES = ("MOS74.jpg", "MOS78.jpg")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``<repo>/../shared/datasets`` (read-only real data), or ``$DETDISTILL_DATASETS``.

    Every developer machine and CI has ``../shared`` beside the project root, so a missing
    folder is a broken checkout: the tests that read real data fail instead of skipping
    silently (a clone elsewhere sets ``DETDISTILL_DATASETS``).
    """
    if not SHARED_DATASETS.is_dir():
        pytest.fail(
            f"shared datasets not found at {SHARED_DATASETS}: clone the project beside ../shared "
            "or set DETDISTILL_DATASETS to the datasets folder"
        )
    return SHARED_DATASETS


# ----------------------------------------------------------------------------- datasets
def write_subset_list(folder: Path, names: tuple[str, ...] = TINY_IMAGES, name: str = "subset.txt") -> Path:
    """A YOLO list file of absolute paths to sample images.

    The YOLO reader resolves relative entries against the list's folder and finds labels by
    replacing the last ``images`` path component with ``labels``; absolute entries into the
    packaged sample therefore keep finding the sample's own label files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    root = sample_dir()
    path = folder / name
    path.write_text("".join(f"{root / 'images' / n}\n" for n in names))
    return path


def _yolo_boxes(label_file: Path, width: int, height: int) -> np.ndarray:
    """``(K, 5)`` rows ``class x0 y0 x1 y1`` in pixels."""
    rows = []
    for line in label_file.read_text().splitlines():
        if line.strip():
            k, cx, cy, w, h = map(float, line.split())
            rows.append([k, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _best_window(boxes: np.ndarray, width: int, height: int, size: int, step: int = 8) -> tuple[int, int]:
    """Top-left corner of the ``size`` window that contains the most whole boxes."""
    best, best_xy = -1, (0, 0)
    for y in range(0, max(1, height - size + 1), step):
        for x in range(0, max(1, width - size + 1), step):
            inside = ((boxes[:, 1] >= x) & (boxes[:, 2] >= y) & (boxes[:, 3] <= x + size) & (boxes[:, 4] <= y + size)).sum()
            if inside > best:
                best, best_xy = int(inside), (x, y)
    return best_xy


def make_crop_dataset(folder: Path, names: tuple[str, ...] = TINY_IMAGES, size: int = 128) -> dict[str, Path]:
    """YOLO dataset of one ``size`` crop per sample image: ``images/``, ``labels/``, ``list.txt``, ``classes.txt``.

    Boxes cut by the crop border are dropped (they stay unlabelled pixels, like the
    sample's own unlabelled border cars); only whole boxes are written.
    """
    root = sample_dir()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    entries = []
    for n in names:
        img = Image.open(root / "images" / n).convert("RGB")
        W, H = img.size
        boxes = _yolo_boxes(root / "labels" / (Path(n).stem + ".txt"), W, H)
        x, y = _best_window(boxes, W, H, size)
        crop = img.crop((x, y, x + size, y + size))
        stem = Path(n).stem
        crop.save(folder / "images" / f"{stem}.png")
        lines = []
        for k, x0, y0, x1, y1 in boxes:
            if x0 >= x and y0 >= y and x1 <= x + size and y1 <= y + size:
                cx, cy = (x0 + x1) / 2 - x, (y0 + y1) / 2 - y
                lines.append(f"{int(k)} {cx / size:.6f} {cy / size:.6f} {(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}\n")
        (folder / "labels" / f"{stem}.txt").write_text("".join(lines))
        entries.append(f"images/{stem}.png\n")
    (folder / "list.txt").write_text("".join(entries))
    (folder / "classes.txt").write_text((root / "classes.txt").read_text())
    return {"root": folder, "list": folder / "list.txt", "classes": folder / "classes.txt"}


@pytest.fixture
def crop_dataset(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """``crop_dataset(names=TINY_IMAGES, size=128) -> {"root", "list", "classes"}`` under ``tmp_path/crops``."""

    def make(names: tuple[str, ...] = TINY_IMAGES, size: int = 128) -> dict[str, Path]:
        return make_crop_dataset(tmp_path / f"crops{size}", names, size)

    return make


# ----------------------------------------------------------------------------- configs
def tiny_config_dict(tmp_path: Path, train_list: Path | None = None, val_list: Path | None = None,
                     classes: Path | None = None) -> dict[str, Any]:
    """The plain dict behind :func:`tiny_config` (also handy to dump as YAML for the CLI)."""
    train_list = train_list or write_subset_list(tmp_path / "data")
    val_list = val_list or train_list
    classes = classes or sample_dir() / "classes.txt"
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs" / "{name}"),
        "model": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 32, "head_convs": 1},
        "data": {
            "train": {"format": "yolo", "path": str(train_list), "classes": str(classes)},
            "val": {"format": "yolo", "path": str(val_list), "classes": str(classes)},
            "crop_size": 128, "workers": 0, "cache_images": True,
        },
        "train": {"steps": 4, "batch_size": 2, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "ckpt_every": 0,
                  "device": "cpu", "amp": "off"},
        "eval": {"max_images": 1},
    }


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.steps", 6)``: set a nested key, creating sections."""
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """Factory ``tiny_config(**overrides) -> Config`` for the 2-image sample subset.

    Overrides use ``__`` for nesting (``train__steps=6``, ``model__norm="gn"``); a top-level
    key replaces the whole value (``data={...}``). ``root=`` picks another folder than
    ``tmp_path`` (two independent runs in one test).
    """

    def make(root: Path | None = None, **overrides: Any) -> Config:
        base = root or tmp_path
        data = tiny_config_dict(base)
        for k, v in overrides.items():
            set_dotted(data, k.replace("__", "."), v)
        return config_from_dict(data)

    return make


@pytest.fixture
def tiny_config_yaml(tmp_path: Path) -> Callable[..., Path]:
    """``tiny_config_yaml(name="tiny.yaml", **overrides) -> path`` of a YAML file of the tiny config dict."""

    def make(name: str = "tiny.yaml", **overrides: Any) -> Path:
        data = tiny_config_dict(tmp_path)
        for k, v in overrides.items():
            set_dotted(data, k.replace("__", "."), v)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (restored afterwards).

    On a shared 2-core machine, OpenMP threads spin-waiting for a descheduled sibling burn
    more CPU than they save; one thread is faster under load and keeps CPU kernels'
    summation order fixed between runs.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
