"""Data layer: format readers with validation, box-aware transforms, tiling, datasets, sampler."""

from detdistill.data.coco import load_coco
from detdistill.data.dataset import EvalDataset, StepBatchSampler, TrainDataset, collate, sample_seed
from detdistill.data.image_io import decode_image
from detdistill.data.readers import READERS, load_detection_set
from detdistill.data.sample import DetectionSet, Sample
from detdistill.data.tiling import merge_tile_detections, tile_windows
from detdistill.data.transforms import EvalTransform, TrainTransform
from detdistill.data.validation import AnnotationError, LoadReport
from detdistill.data.voc import load_voc
from detdistill.data.yolo import load_yolo

__all__ = [
    "READERS",
    "AnnotationError",
    "DetectionSet",
    "EvalDataset",
    "EvalTransform",
    "LoadReport",
    "Sample",
    "StepBatchSampler",
    "TrainDataset",
    "TrainTransform",
    "collate",
    "decode_image",
    "load_coco",
    "load_detection_set",
    "load_voc",
    "load_yolo",
    "merge_tile_detections",
    "sample_seed",
    "tile_windows",
]
