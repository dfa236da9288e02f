"""The transformers DETR adapter: build, targets, loss, per-layer outputs, taps, predict, export.

Runs when transformers is installed (the ``[detr]`` extra); the core suite passes without it.
Models are tiny (d_model 32, 8 queries, 2 decoder layers, 64-96 px images) so every
architecture runs on a loaded 2-core CPU in seconds. The network is refused throughout: a
hub look-up anywhere would fail the test.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("transformers") is None:  # the core suite runs without the [detr] extra
    pytest.importorskip("transformers")

from detdistill.adapters.base import get_adapter  # noqa: E402
from detdistill.config import ModelConfig  # noqa: E402
from detdistill.structures import Batch, Target  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ADAPTER = get_adapter("transformers")
ARCHS = ADAPTER.archs()
NUM_CLASSES = 3


def tiny_options(arch: str, layers: int = 2, d_model: int = 32) -> dict:
    opts = {"d_model": d_model, "num_queries": 8, "decoder_layers": layers, "encoder_layers": 1,
            "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    if arch.startswith("rt_detr"):
        opts["num_denoising"] = 6
    return opts


def tiny(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ADAPTER.build(ModelConfig(framework="transformers", arch=arch, options=tiny_options(arch, **kw)), NUM_CLASSES)


def two_images() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 96, 64, generator=g)]
    targets = [Target(torch.tensor([[8.0, 4.0, 40.0, 28.0], [50.0, 30.0, 90.0, 60.0]]), torch.tensor([1, 2]), 0),
               Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 1)]
    return Batch(images, targets)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    for owner, name in ((socket, "getaddrinfo"), (socket, "create_connection"), (socket.socket, "connect")):
        monkeypatch.setattr(owner, name, refuse)


def test_labels_are_normalised_cxcywh_in_each_familys_frame() -> None:
    batch = two_images()
    deformable, rt = tiny("deformable_detr"), tiny("rt_detr")
    own = ADAPTER._labels(deformable, batch, (96, 96))[0]
    # image 0 is 64 x 96 (H x W): box [8, 4, 40, 28] -> centre (24, 16), size (32, 24), by its own size
    assert torch.allclose(own["boxes"][0], torch.tensor([24 / 96, 16 / 64, 32 / 96, 24 / 64]))
    assert own["class_labels"].tolist() == [1, 2]
    padded = ADAPTER._labels(rt, batch, (96, 96))[0]  # RT-DETR reads no mask: the padded input is the frame
    assert torch.allclose(padded["boxes"][0], torch.tensor([24 / 96, 16 / 96, 32 / 96, 24 / 96]))
    pixels, mask = ADAPTER._inputs(deformable, batch.images)
    assert pixels.shape == (2, 3, 96, 96) and mask[0, :64, :].all() and not mask[0, 64:, :].any()
    assert not mask[1, :, 64:].any() and mask[1, :, :64].all()


@pytest.mark.parametrize("arch", ARCHS)
def test_task_loss_is_the_models_own_loss_and_raw_outputs_drop_denoising_queries(arch: str) -> None:
    model = tiny(arch).train()
    batch = two_images()
    torch.manual_seed(5)  # RT-DETR draws its denoising noise from the global RNG
    losses, raw = ADAPTER.forward_train(model, batch, need_raw=True)
    pixels, mask = ADAPTER._inputs(model, batch.images)
    torch.manual_seed(5)
    direct = model(pixel_values=pixels, pixel_mask=mask, labels=ADAPTER._labels(model, batch, (96, 96)))
    assert list(losses) == ["detr_loss"]
    assert torch.equal(losses["detr_loss"], direct.loss) and torch.isfinite(direct.loss)
    n_cls = NUM_CLASSES + 1 if arch == "detr" else NUM_CLASSES  # DETR's extra "no object" logit
    assert len(raw.layer_logits) == len(raw.layer_boxes) == 2  # one per decoder layer, last last
    for logits, boxes in zip(raw.layer_logits, raw.layer_boxes):
        assert logits.shape == (2, 8, n_cls) and boxes.shape == (2, 8, 4)  # the 8 queries, no denoising ones
    assert torch.equal(raw.layer_logits[-1], direct.logits[:, -8:]) and torch.equal(raw.layer_boxes[-1], direct.pred_boxes[:, -8:])
    assert raw.queries.shape == (2, 8, 32)
    assert raw.class_activation == ("softmax" if arch == "detr" else "sigmoid")
    losses["detr_loss"].backward()
    assert all(p.grad is not None for p in ADAPTER.backbone_parameters(model) if p.requires_grad)


@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr"])
def test_teacher_forward_gives_the_same_per_layer_outputs_as_inference(arch: str) -> None:
    model = tiny(arch).eval()
    images = two_images().images
    with torch.no_grad():
        raw = ADAPTER.forward_features(model, images, need_head=True)
        pixels, mask = ADAPTER._inputs(model, images)
        plain = model(pixel_values=pixels, pixel_mask=mask)
    assert len(raw.layer_logits) == 2
    assert torch.equal(raw.layer_logits[-1], plain.logits) and torch.equal(raw.layer_boxes[-1], plain.pred_boxes)


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_name_backbone_neck_encoder_and_decoder_with_strides(arch: str) -> None:
    taps = ADAPTER.taps(tiny(arch))
    assert [(taps[f"backbone.stage{k}"].channels, taps[f"backbone.stage{k}"].stride) for k in (1, 2, 3, 4)] == \
        [(64, 4), (128, 8), (256, 16), (512, 32)]
    necks = {n: (t.channels, t.stride) for n, t in taps.items() if n.startswith("neck.")}
    expected = {"detr": {"neck.p5": (32, 32)}, "conditional_detr": {"neck.p5": (32, 32)},
                "deformable_detr": {"neck.p3": (32, 8), "neck.p4": (32, 16), "neck.p5": (32, 32), "neck.p6": (32, 64)}}
    assert necks == expected.get(arch, {"neck.p3": (32, 8), "neck.p4": (32, 16), "neck.p5": (32, 32)})
    assert taps["decoder.layer0"].kind == "tokens" and taps["decoder.layer1"].channels == 32
    encoder = [n for n in taps if n.startswith("encoder.")]
    expected_encoder = {"deformable_detr": ["encoder.tokens", "encoder.p3", "encoder.p4", "encoder.p5", "encoder.p6"],
                        "rt_detr": ["encoder.p3", "encoder.p4", "encoder.p5"], "rt_detr_v2": ["encoder.p3", "encoder.p4", "encoder.p5"]}
    assert encoder == expected_encoder.get(arch, ["encoder.tokens"])
    for name in encoder:
        if name != "encoder.tokens":
            assert taps[name].kind == "map" and taps[name].stride == taps[name.replace("encoder", "neck")].stride


def test_deformable_encoder_level_maps_are_its_output_sequence_cut_by_level() -> None:
    import copy

    from detdistill.taps import FeatureTaps

    model = tiny("deformable_detr").eval()
    taps = ADAPTER.taps(model)
    levels = {n: taps[n] for n in ("encoder.tokens", "encoder.p3", "encoder.p4", "encoder.p5", "encoder.p6")}
    images = two_images().images
    with FeatureTaps(model, levels) as rec, torch.no_grad():
        ADAPTER.forward_features(model, images, need_head=False)
        tokens = rec.get("encoder.tokens")
        maps = [rec.get(f"encoder.p{k}") for k in (3, 4, 5, 6)]
    assert tokens.shape[1] == sum(m.shape[-2] * m.shape[-1] for m in maps)
    start = 0
    for m in maps:  # map[n, :, y, x] is token start + y * W + x
        n, d, h, w = m.shape
        assert torch.equal(m, tokens[:, start:start + h * w].transpose(1, 2).reshape(n, d, h, w))
        start += h * w
    # a copy (the EMA) keeps its own level points, and the state dict is the plain model's
    twin = copy.deepcopy(model)
    assert twin.model.encoder.detdistill_levels is not model.model.encoder.detdistill_levels
    assert not any("detdistill_levels" in k for k in model.state_dict())


@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr", "detr"])
def test_predict_uses_the_processors_post_processing_in_pixels(arch: str) -> None:
    model = tiny(arch)
    images = two_images().images
    dets = ADAPTER.predict(model, images)
    pixels, mask = ADAPTER._inputs(model, images)
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels, pixel_mask=mask)
    from detdistill.models import hf_detr

    frame = [(64, 96), (96, 64)] if hf_detr.family(arch).masks_padding else [(96, 96)] * 2
    kwargs = {"top_k": 100} if arch == "deformable_detr" else {}
    ref = hf_detr.image_processor(arch).post_process_object_detection(out, threshold=0.05, target_sizes=frame, **kwargs)
    for d, r, (h, w) in zip(dets, ref, [(64, 96), (96, 64)]):
        order = r["scores"].argsort(descending=True)[:100]
        assert torch.allclose(d.scores, r["scores"][order])
        assert torch.equal(d.labels, r["labels"][order])
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all() and (d.boxes >= 0).all()


@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr"])
def test_export_loads_in_plain_transformers_with_identical_outputs(arch: str, tmp_path: Path) -> None:
    import transformers

    from detdistill.models import hf_detr

    model = tiny(arch)
    model.train()
    loss, _ = ADAPTER.forward_train(model, two_images())  # move BN statistics off their init
    cfg = ModelConfig(framework="transformers", arch=arch, options=tiny_options(arch))
    ADAPTER.export(model, cfg, NUM_CLASSES, tmp_path, class_names=["car", "truck", "bus"])
    loaded = getattr(transformers, hf_detr.family(arch).model).from_pretrained(str(tmp_path), local_files_only=True).eval()
    processor = getattr(transformers, hf_detr.family(arch).processor).from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.config.id2label == {0: "car", 1: "truck", 2: "bus"}
    image = two_images().images[0]
    inputs = processor(images=[image], return_tensors="pt")
    pixels, _ = ADAPTER._inputs(model, [image])
    assert torch.allclose(inputs["pixel_values"], pixels, atol=1e-6)  # the saved processor prepares inputs as we do
    with torch.no_grad():
        ours = model.eval()(pixel_values=pixels)
        theirs = loaded(pixel_values=inputs["pixel_values"])
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5) and torch.allclose(ours.pred_boxes, theirs.pred_boxes, atol=1e-6)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["class_names"] == ["car", "truck", "bus"] and meta["arch"] == arch
    # and detdistill reads the folder back as model.weights
    again = ADAPTER.build(cfg.model_copy(update={"weights": str(tmp_path)}), NUM_CLASSES).eval()
    with torch.no_grad():
        assert torch.equal(again(pixel_values=pixels).logits, theirs.logits)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"model.options \['num_querys'\] are not settings of transformers' RTDetrConfig; "
                                         r"valid: .*num_queries"):
        ADAPTER.build(ModelConfig(framework="transformers", arch="rt_detr", options={"num_querys": 5}), 2)
    with pytest.raises(ValueError, match=r"model.options \['backbone_config'\]: detdistill sets these itself"):
        ADAPTER.build(ModelConfig(framework="transformers", arch="rt_detr", options={"backbone_config": {}}), 2)
    with pytest.raises(ValueError, match="model.fpn_channels does not apply to transformers DETRs"):
        ADAPTER.build(ModelConfig(framework="transformers", arch="rt_detr", fpn_channels=128), 2)
    with pytest.raises(ValueError, match="model.backbone 'resnet101'.*resnet18, resnet34, resnet50"):
        ADAPTER.build(ModelConfig(framework="transformers", arch="rt_detr", backbone="resnet101"), 2)
    with pytest.raises(ValueError, match="model.arch 'yolo_detr'.*rt_detr"):
        ADAPTER.build(ModelConfig(framework="transformers", arch="yolo_detr"), 2)
    with pytest.raises(ValueError, match=r"model.options \['num_queries'\]: the torchvision adapter takes no options"):
        get_adapter("torchvision").build(ModelConfig(arch="fcos", options={"num_queries": 5}), 2)


@pytest.mark.parametrize("backbone,widths", [("resnet34", [128, 256, 512]), ("resnet50", [512, 1024, 2048])])
def test_backbone_depth_is_selectable(backbone: str, widths: list[int]) -> None:
    torch.manual_seed(0)
    model = ADAPTER.build(ModelConfig(framework="transformers", arch="rt_detr", backbone=backbone,
                                      options=tiny_options("rt_detr")), 2)
    assert model.config.backbone_config.depths == [3, 4, 6, 3]
    assert model.config.encoder_in_channels == widths


def test_cli_trains_evaluates_distils_and_exports_a_detr(tmp_path: Path, tiny_config_yaml, capsys) -> None:
    """The whole loop through the CLI: train an RT-DETR, evaluate it with detdistill's COCO
    evaluator, use it as the teacher of a DETRDistill run, export the student and load it back."""
    import transformers

    from detdistill.cli import main

    model = {"framework": "transformers", "arch": "rt_detr", "options": tiny_options("rt_detr")}
    cfg = tiny_config_yaml("detr.yaml", output_dir=str(tmp_path / "runs" / "detr"), model=model, data__crop_size=96, train__optimizer="adamw",
                           train__lr=2e-4, train__grad_clip=0.1)
    assert main(["train", str(cfg), "train.steps=2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "AP50" in out and "APs" in out
    ckpt = tmp_path / "runs" / "detr" / "checkpoints" / "last.pt"
    assert main(["eval", str(cfg), "--checkpoint", str(ckpt)]) == 0
    assert "per-class AP" in capsys.readouterr().out
    distill = tiny_config_yaml("kd.yaml", output_dir=str(tmp_path / "runs" / "kd"), model=model, data__crop_size=96, train__optimizer="adamw",
                               train__lr=2e-4, teacher={"checkpoint": str(ckpt)},
                               distill=[{"method": "detr_logits"},
                                        {"method": "detr_feature", "pairs": [["neck.p3", "neck.p3"]]}])
    assert main(["distill", str(distill), "train.steps=2", "--quiet"]) == 0
    kd_run = tmp_path / "runs" / "kd"
    logged = (kd_run / "metrics.jsonl").read_text()
    assert "kd/detr_logits/cls" in logged and "kd/detr_feature" in logged
    exp = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(kd_run / "checkpoints" / "last.pt"), "--out", str(exp)]) == 0
    loaded = transformers.RTDetrForObjectDetection.from_pretrained(str(exp), local_files_only=True)
    assert loaded.config.id2label[0] == "car"
    assert not any("connector" in k for k in loaded.state_dict())  # the student alone


def test_unsupported_export_format_is_a_one_line_cli_error(tmp_path: Path, tiny_config_yaml, capsys) -> None:
    from detdistill.cli import main

    model = {"framework": "transformers", "arch": "rt_detr", "options": tiny_options("rt_detr")}
    cfg = tiny_config_yaml("detr.yaml", output_dir=str(tmp_path / "runs" / "detr"), model=model, data__crop_size=64,
                           eval__max_images=1)
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "runs" / "detr" / "checkpoints" / "last.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "ONNX export of transformers DETRs is not supported" in capsys.readouterr().err
