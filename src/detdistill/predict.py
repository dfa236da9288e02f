"""``detdistill predict``: run a checkpoint on images or folders; draw the boxes, optionally write COCO results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from .config import EvalConfig
from .data.image_io import decode_image
from .data.yolo import IMAGE_SUFFIXES
from .engine.device import resolve_device
from .engine.evaluate import predict_image
from .engine.restore import restore_model
from .report.progress import live_bar

#: Distinct, readable box colours (matplotlib's tab10), one per class index.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def expand_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted); a missing path or an empty folder is an error."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {item}")
            out += found
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return out


def _font() -> str | None:
    """A TrueType font shipped with matplotlib (a dependency), so labels scale with the image."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # noqa: BLE001 - torchvision falls back to PIL's small bitmap font
        return None


def predict_images(checkpoint: str | Path, images: Sequence[str | Path], *, out_dir: Path, score_thresh: float = 0.3,
                   tile_size: int = 0, device: str = "auto", json_path: Path | None = None,
                   progress: bool = True) -> list[Path]:
    """Predict each image (files, or folders of images) and save ``<out_dir>/<name>.png`` with
    boxes labelled ``class score`` on a filled background, sized to the image.

    With ``json_path``, every detection (not only those drawn) is also written in the COCO
    results format: ``image_id`` is the image's position in the input order, ``category_id``
    the class's original id, ``bbox`` ``[x, y, w, h]`` in pixels, plus ``file_name``.
    """
    paths = expand_images(images)
    dev = resolve_device(device, key="--device")
    r = restore_model(checkpoint, dev)
    cfg = EvalConfig(tile_size=tile_size, max_dets=r.config.model.detections_per_img)
    out_dir.mkdir(parents=True, exist_ok=True)
    font = _font()
    written, results = [], []
    for index, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=not live_bar(progress))):
        image_u8 = decode_image(path)
        dets = predict_image(r.model, r.adapter, (image_u8.float() / 255).to(dev), cfg,
                             nms_thresh=r.config.model.nms_thresh).to("cpu")
        for box, score, label in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist()):
            x0, y0, x1, y1 = box
            results.append({"image_id": index, "file_name": path.name, "category_id": r.category_ids[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
        keep = dets.scores >= score_thresh
        labels = [f"{r.class_names[int(k)]} {float(s):.2f}" for k, s in zip(dets.labels[keep], dets.scores[keep])]
        colors = [PALETTE[int(k) % len(PALETTE)] for k in dets.labels[keep]]
        short = min(image_u8.shape[-2:])
        drawn = draw_bounding_boxes(image_u8, dets.boxes[keep], labels=labels, colors=colors,
                                    width=max(1, short // 400), font=font, font_size=max(10, short // 50),
                                    label_colors="white", label_background_colors=colors, fill_labels=True)
        out = out_dir / f"{path.stem}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out)
        written.append(out)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results))
    return written
