"""``adapter.head`` + ``adapter.head_loss`` reproduce ``forward_train`` exactly.

A method such as ScaleKD runs the student's own head on other features and supervises the
result with ground truth. The protocol promises that, on the model's *own* neck features,
``head_loss(head(features))`` is the very loss ``forward_train`` computes. Checked here for
every detector family with the same weights and batch. Faster R-CNN samples anchors and
regions at random; its samplers are set to keep every candidate, so both paths see the same
sets (the order of random draws differs between the two paths, the kept sets do not).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import ModelConfig
from detdistill.structures import Batch, Target

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(h: int = 96, w: int = 128) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g), torch.rand(3, h - 32, w, generator=g)]  # padded: two geometries
    targets = [Target(torch.tensor([[8.0, 8.0, 30.0, 26.0], [40.0, 20.0, 90.0, 70.0]]), torch.tensor([0, 2]), 0),
               Target(torch.tensor([[10.0, 3.0, 100.0, 60.0]]), torch.tensor([1]), 1)]
    return Batch(images, targets)


def _neck_features(adapter, model, batch: Batch) -> list[torch.Tensor]:
    """The maps the head consumed in a forward_train, recorded with a hook on the head's input."""
    seen: list[list[torch.Tensor]] = []
    head = model.head if hasattr(model, "head") else None
    if head is not None:
        handle = head.register_forward_hook(lambda _m, args, _o: seen.append(list(args[0])))
    else:  # Faster R-CNN: the RPN head sees the FPN maps
        handle = model.rpn.head.register_forward_hook(lambda _m, args, _o: seen.append(list(args[0])))
    try:
        adapter.forward_train(model, batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["fcos", "retinanet", "yolo_pafpn", "fasterrcnn"])
def test_torchvision_head_and_head_loss_equal_forward_train(arch: str) -> None:
    adapter = get_adapter("torchvision")
    torch.manual_seed(0)
    model = adapter.build(ModelConfig(arch=arch, backbone="resnet18", fpn_channels=32, norm="gn",
                                      head_convs=4 if arch == "retinanet" else 1), 3).train()
    if arch == "fasterrcnn":  # keep every anchor / region: sampling becomes a fixed set
        model.rpn.fg_bg_sampler.batch_size_per_image = 10**6
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 10**6
    batch = _batch()
    want, raw = adapter.forward_train(model, batch)
    assert raw.input_size == (96, 128) and raw.image_sizes == [(96, 128), (64, 128)]
    feats = _neck_features(adapter, model, batch)
    out = adapter.head(model, feats, raw, batch)
    got = adapter.head_loss(model, out, batch)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert sum(float(v.detach()) for v in got.values()) > 0
    if arch != "fasterrcnn":
        a = out.cls_logits.shape[1]
        assert out.cls_logits.shape == (2, a, 3) and out.box_preds.shape == (2, a, 4)
        assert out.box_format == ("retinanet_deltas" if arch == "retinanet" else "fcos_ltrb")
        assert out.strides[0] == 8
    # the head is the model's: its gradient reaches the head's parameters from the head_loss
    total = sum(got.values())
    params = list((model.head if arch != "fasterrcnn" else model.roi_heads).parameters())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="the [yolo] extra is not installed")
def test_ultralytics_head_and_head_loss_equal_forward_train() -> None:
    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    model = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8n"), 3).train()
    batch = _batch()
    want, raw = adapter.forward_train(model, batch, need_raw=True)
    out = adapter.head(model, raw.features, raw)
    got = adapter.head_loss(model, out, batch)
    assert sorted(got) == sorted(want) == ["box", "cls", "dfl"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(out.cls_logits, raw.cls_logits)
    with pytest.raises(ValueError, match="takes 3 maps"):
        adapter.head(model, raw.features[:2], raw)


@pytest.mark.parametrize("framework", ["torchvision", "ultralytics"])
def test_adapters_without_extra_inputs_refuse_them(framework: str) -> None:
    if framework == "ultralytics" and importlib.util.find_spec("ultralytics") is None:
        pytest.skip("the [yolo] extra is not installed")
    adapter = get_adapter(framework)
    cfg = ModelConfig(framework=framework, arch="yolov8n") if framework == "ultralytics" else \
        ModelConfig(arch="fcos", fpn_channels=32, head_convs=1)
    model = adapter.build(cfg, 3).train()
    with pytest.raises(ValueError, match=r"no extra training inputs; got \['query_group'\]"):
        adapter.forward_train(model, _batch(), extra_inputs={"query_group": torch.zeros(1)})
