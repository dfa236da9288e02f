"""Decoding image files to ``uint8`` RGB tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, read_file
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms.v2 import functional as F


def decode_image(path: str | Path) -> Tensor:
    """Decode an image file to an RGB ``uint8`` tensor of shape ``(3, H, W)``.

    JPEG/PNG/WEBP/GIF go through torchvision's decoders (libjpeg-turbo, libpng); grayscale,
    palette and RGBA images are converted to RGB (alpha dropped), 16-bit PNGs scaled to 8 bit.
    Formats torchvision cannot decode (TIFF, BMP, ...) fall back to PIL. EXIF orientation is
    *not* applied, matching ``PIL.Image.open(p).size`` used by the readers, so boxes stay in
    the frame the annotation tools stored.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be decoded (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing image {path}")
    try:
        with warnings.catch_warnings():
            # torchvision >= 0.29 deprecates its decoders in favour of torchcodec; still the fastest here.
            warnings.filterwarnings("ignore", message=".*image decoding.*deprecated", category=DeprecationWarning)
            img = _tv_decode(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises many types for corrupt data
            raise ValueError(f"cannot decode image {path}: {e} (set `data.verify_images: true` to decode every "
                             "image when the data loads, so a corrupt file fails at once)") from None
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if img.dtype != torch.uint8:
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img
