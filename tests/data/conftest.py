"""Shared fixtures for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def datasets_dir(shared_datasets: Path) -> Path:
    """``../shared/datasets`` beside the project root (read-only real data); see the root conftest."""
    return shared_datasets


def _write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    """Write a small random image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


@pytest.fixture
def write_image():
    """``write_image(path, width, height, mode="RGB", seed=0) -> path``: a random test image."""
    return _write_image
