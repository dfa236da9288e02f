"""ONNX export runs in onnxruntime with the PyTorch model's outputs (the ``onnx`` extra).

Tolerances: boxes within 1e-3 px and scores within 1e-4 (float32 kernels differ between
runtimes); labels and the number of detections exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import ModelConfig

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["fcos", "fasterrcnn"])
def test_torchvision_onnx_matches_predict_at_two_sizes(arch: str, tmp_path: Path) -> None:
    adapter = get_adapter("torchvision")
    torch.manual_seed(0)
    model = adapter.build(ModelConfig(arch=arch, fpn_channels=32, head_convs=1, score_thresh=0.0,
                                      detections_per_img=25), 3).eval()
    session = _session(adapter.export_onnx(model, tmp_path / "model.onnx"))
    for h, w in ((128, 160), (96, 224)):  # another size than the traced one
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h))
        want = adapter.predict(model, [image])[0]
        boxes, scores, labels = session.run(None, {"images": image[None].numpy()})
        assert len(want.boxes) > 0 and boxes.shape == tuple(want.boxes.shape), (h, w)
        np.testing.assert_allclose(boxes, want.boxes.numpy(), atol=1e-3)
        np.testing.assert_allclose(scores, want.scores.numpy(), atol=1e-4)
        np.testing.assert_array_equal(labels, want.labels.numpy())


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="the [yolo] extra is not installed")
def test_ultralytics_onnx_matches_the_decoded_head_with_dynamic_batch_and_size(tmp_path: Path) -> None:
    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    model = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8n"), 3).eval()
    session = _session(adapter.export_onnx(model, tmp_path / "model.onnx"))
    for shape in ((2, 3, 96, 128), (1, 3, 160, 64)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            want = model(x)[0]  # eval mode: (decoded (N, 4 + C, A), raw)
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == tuple(want.shape) == (shape[0], 4 + 3, (shape[2] // 8) * (shape[3] // 8) * 21 // 16)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-3, rtol=1e-4)


def test_cli_export_onnx_writes_graph_and_classes(tiny_config_yaml, tmp_path: Path, capsys) -> None:
    from detdistill.cli import main

    cfg = tiny_config_yaml()
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    out = tmp_path / "onnx_export"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "onnx"]) == 0
    assert "ONNX graph" in capsys.readouterr().out
    assert (out / "model.onnx").is_file() and json.loads((out / "model.json").read_text())["class_names"][0] == "car"
    boxes, scores, labels = _session(out / "model.onnx").run(None, {"images": np.random.rand(1, 3, 96, 96).astype(np.float32)})
    assert boxes.shape[1] == 4 and scores.shape == labels.shape
