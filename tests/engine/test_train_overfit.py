"""End-to-end learning check: FCOS overfits two small images.

Train and val are the *same* two 160x160 crops of sample images (every whole car in the crop
labelled). With ``crop_size`` equal to the image size, scale jitter off, no flips and no
object-centred crops, every training sample is exactly a whole val image, so the loop is
asked to memorise the val set: AP must rise from ~0 (random init) to near 100. This catches
broken label/box plumbing, a loss that does not reach the weights, an LR schedule stuck at
zero, or evaluation that disagrees with training frames.
"""

from __future__ import annotations

import math

import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.data.dataset import EvalDataset
from detdistill.data.transforms import EvalTransform
from detdistill.engine.evaluate import evaluate
from detdistill.data.splits import load_split
from detdistill.engine.device import seed_everything
from detdistill.engine.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 160
STEPS = 30


def test_fcos_overfits_two_images(crop_dataset, tiny_config):
    ds = crop_dataset(size=SIZE)
    data = {
        "train": {"format": "yolo", "path": str(ds["list"]), "classes": str(ds["classes"])},
        "val": {"format": "yolo", "path": str(ds["list"]), "classes": str(ds["classes"])},
        "crop_size": SIZE, "scale_range": [1.0, 1.0], "hflip": 0.0, "vflip": 0.0,
        "object_centered_crop_p": 0.0, "workers": 0, "cache_images": True,
    }
    cfg = tiny_config(data=data, train__steps=STEPS, train__optimizer="adamw", train__lr=1e-3,
                      train__warmup_steps=5, train__schedule="constant", train__log_every=10,
                      eval__max_images=None)

    # The step-0 model exactly as train() builds it: same seed, same adapter.build call.
    val = load_split(cfg, "val")
    assert len(val) == 2 and sum(s.num_boxes for s in val.samples) >= 6
    seed_everything(cfg.seed)
    adapter = get_adapter(cfg.model.framework)
    model0 = adapter.build(cfg.model, val.num_classes)
    before = evaluate(model0, adapter, EvalDataset(val, EvalTransform()), cfg.eval, torch.device("cpu"),
                      progress=False, nms_thresh=cfg.model.nms_thresh)

    result = train(cfg, resume=False, progress=False)
    after = result.final
    assert after is not None and result.steps == STEPS
    assert after.num_images == 2
    before_ap50 = before.AP50 if math.isfinite(before.AP50) else 0.0
    assert after.AP50 >= 20.0, f"AP50 only {after.AP50:.1f} after {STEPS} steps on its own training images"
    assert after.AP50 > before_ap50 + 15.0, f"AP50 {before_ap50:.1f} -> {after.AP50:.1f}"
    assert after.AP > (before.AP if math.isfinite(before.AP) else 0.0) + 10.0

    # The run left its artefacts behind.
    run = result.run_dir
    assert (run / "checkpoints" / "last.pt").is_file()
    assert (run / "final_metrics.json").is_file()
    assert (run / "export" / "model.safetensors").is_file()
