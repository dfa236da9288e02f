"""Load an exported ultralytics student with torch + ultralytics only; also its ``load_model.py``.

``detdistill export`` copies this very file next to the weights as ``load_model.py``::

    python load_model.py   # rebuilds the DetectionModel from model.json and loads model.safetensors (strict)

    from load_model import load, detect
    model = load("path/to/export")
    boxes, scores, labels = detect(model, image)   # image: (3, H, W) float RGB in [0, 1]

Inputs: RGB float tensors in [0, 1] at native resolution (the model was trained without
resizing), padded bottom/right to a multiple of the model's largest stride.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # skip ultralytics' import-time network probe

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def load(folder: str | Path = ".") -> Any:
    """The exported ``DetectionModel`` in ``folder`` (``model.json`` + ``model.safetensors``), in eval mode."""
    from ultralytics.nn.tasks import DetectionModel

    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    model = DetectionModel(cfg=spec["yaml"], nc=spec["num_classes"], verbose=False)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


@torch.no_grad()
def detect(model: Any, image: torch.Tensor, score_thresh: float = 0.05, nms_thresh: float = 0.6,
           max_det: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes xyxy px, scores, labels)`` for one ``(3, H, W)`` float image in ``[0, 1]``."""
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:  # older ultralytics keep NMS in utils/ops.py
        from ultralytics.utils.ops import non_max_suppression

    s = int(model.stride.max())
    h, w = image.shape[-2:]
    x = F.pad(image, (0, -w % s, 0, -h % s), value=114 / 255)[None]
    det = non_max_suppression(model(x)[0], conf_thres=score_thresh, iou_thres=nms_thresh, multi_label=True,
                              max_det=max_det, nc=model.model[-1].nc)[0]
    boxes = det[:, :4].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes, det[:, 4], det[:, 5].long()


if __name__ == "__main__":
    print(type(load(Path(__file__).parent)).__name__, "loaded")
