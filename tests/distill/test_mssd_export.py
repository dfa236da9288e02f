"""MSSD leaves no trace at inference: the exported student is exactly the baseline detector.

Trains a PAFPN-FCOS with an MSSD term through the real ``train`` entry point, then checks
that the exported weights have exactly the keys and shapes of a plain ``yolo_pafpn`` build
(the mask adaptation layers stay behind in the Distiller) and that the exported model,
rebuilt by its own ``load_model.py``, predicts exactly what the trained model predicts.
"""

from __future__ import annotations

import runpy

import torch
from safetensors.torch import load_file

from detdistill.adapters.base import get_adapter
from detdistill.engine.checkpoint import load_checkpoint
from detdistill.engine.restore import restore_model
from detdistill.engine.train import train

MSSD_TERM = {"method": "mssd", "weight": 1.0, "pairs": [["fpn.p3", "pan.p3"], ["fpn.p4", "pan.p4"], ["fpn.p5", "pan.p5"]],
             "params": {"mask_weight": 1.0, "use_mask_weighting": True}}


def test_mssd_student_exports_the_baseline_architecture_with_identical_outputs(tiny_config, single_thread):
    cfg = tiny_config(model__arch="yolo_pafpn", model__head_convs=1, model__score_thresh=0.0, train__steps=2,
                      distill=[MSSD_TERM])  # score_thresh 0: compare many boxes, not an empty set
    result = train(cfg, resume=False, progress=False)
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert ckpt["distiller"], "the MSSD adaptation layers are trained, so the Distiller has state"
    assert all(k.startswith("methods.mssd.") for k in ckpt["distiller"])

    exported = load_file(str(result.run_dir / "export" / "model.safetensors"))
    baseline = get_adapter("torchvision").build(cfg.model, 5).state_dict()
    assert set(exported) == set(baseline)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in baseline.items()}

    trained = restore_model(result.run_dir / "checkpoints" / "last.pt")
    plain = runpy.run_path(str(result.run_dir / "export" / "load_model.py"))["load"](result.run_dir / "export")
    image = torch.rand(3, 160, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.adapter.predict(trained.model, [image])[0]
        got = plain([image])[0]
    assert len(want.boxes) > 0
    assert torch.equal(got["boxes"], want.boxes)
    assert torch.equal(got["scores"], want.scores)
    assert torch.equal(got["labels"], want.labels)
