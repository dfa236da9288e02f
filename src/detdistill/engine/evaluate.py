"""COCO evaluation of any adapter's detector on whole images (optionally tiled and merged)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..adapters.base import DetectorAdapter
from ..config import EvalConfig
from ..data.dataset import EvalDataset
from ..data.tiling import merge_tile_detections, tile_windows
from ..report.progress import live_bar
from ..structures import Detections
from .coco_eval import CocoEvaluator, EvalResult
from .distributed import DistInfo


@torch.no_grad()
def predict_image(model: nn.Module, adapter: DetectorAdapter, image: Tensor, cfg: EvalConfig, *,
                  nms_thresh: float = 0.6, tile_batch: int = 4) -> Detections:
    """Detections for one whole image ``(3, H, W)``.

    With ``cfg.tile_size`` set and the image larger than a tile, the image is cut into
    overlapping tiles, each tile is predicted, and the boxes are shifted back and merged
    with class-wise NMS: the memory of one tile, the resolution of the original.
    """
    h, w = image.shape[-2:]
    if not cfg.tile_size or max(h, w) <= cfg.tile_size:
        return adapter.predict(model, [image])[0]
    windows = tile_windows(w, h, cfg.tile_size, cfg.tile_overlap)
    per_tile = []
    for i in range(0, len(windows), tile_batch):
        chunk = windows[i:i + tile_batch]
        dets = adapter.predict(model, [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in chunk])
        per_tile += [(d.boxes, d.scores, d.labels, (x0, y0)) for d, (x0, y0, _, _) in zip(dets, chunk)]
    return merge_tile_detections(per_tile, iou=nms_thresh, max_dets=cfg.max_dets)


@torch.no_grad()
def evaluate(model: nn.Module, adapter: DetectorAdapter, dataset: EvalDataset, cfg: EvalConfig, device: torch.device,
             *, info: DistInfo | None = None, progress: bool = True, nms_thresh: float = 0.6) -> EvalResult:
    """AP, AP50, AP75, APs/m/l and per-class AP of ``model`` on ``dataset``.

    Under DDP each rank predicts a strided shard of the images and the evaluator state
    is gathered before computing, so every rank returns the same result.
    """
    info = info or DistInfo()
    dset = dataset.data
    evaluator = CocoEvaluator(dset.class_names, dset.category_ids, max_dets=cfg.max_dets)
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    indices = range(info.rank, n, info.world_size)
    for i in tqdm(indices, desc="eval", unit="img", disable=not (live_bar(progress) and info.is_main), leave=False):
        image, _ = dataset[i]
        sample = dset.samples[i]
        dets = predict_image(model, adapter, image.to(device), cfg, nms_thresh=nms_thresh)
        evaluator.add_ground_truth(sample.image_id, sample.width, sample.height, sample.boxes, sample.labels, sample.iscrowd)
        evaluator.add_detections(sample.image_id, dets.to("cpu"))
    evaluator.gather()
    return evaluator.compute()
