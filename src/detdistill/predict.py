"""``detdistill predict``: run a checkpoint on image files and write copies with drawn boxes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from .config import EvalConfig
from .data.image_io import decode_image
from .engine.evaluate import predict_image
from .engine.restore import restore_model
from .engine.device import resolve_device


def predict_images(checkpoint: str | Path, images: list[str | Path], *, out_dir: Path, score_thresh: float = 0.3,
                   tile_size: int = 0, device: str = "auto") -> list[Path]:
    """Predict each image and save ``<out_dir>/<name>.png`` with boxes labelled ``class score``."""
    dev = resolve_device(device, key="--device")
    r = restore_model(checkpoint, dev)
    cfg = EvalConfig(tile_size=tile_size, max_dets=r.config.model.detections_per_img)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm([Path(p) for p in images], desc="predict", unit="img"):
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        image_u8 = decode_image(path)
        dets = predict_image(r.model, r.adapter, (image_u8.float() / 255).to(dev), cfg,
                             nms_thresh=r.config.model.nms_thresh).to("cpu")
        keep = dets.scores >= score_thresh
        labels = [f"{r.class_names[int(k)]} {float(s):.2f}" for k, s in zip(dets.labels[keep], dets.scores[keep])]
        drawn = draw_bounding_boxes(image_u8, dets.boxes[keep], labels=labels, colors="red", width=2)
        out = out_dir / f"{path.stem}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out)
        written.append(out)
    return written
