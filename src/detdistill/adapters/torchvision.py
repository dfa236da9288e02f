"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN, PAFPN-FCOS) behind the adapter seam.

torchvision quirks handled here and nowhere else:

- ``model(images, targets)`` returns a loss dict in train mode and detections in eval mode.
- ``GeneralizedRCNNTransform`` resizes every image to ``min_size``; detdistill's data
  pipeline owns the scale (tiny aerial objects need native resolution), so the
  transform is replaced by one that only normalises and pads.
- Faster R-CNN reserves label 0 for background; FCOS/RetinaNet do not.
- ``resnet_fpn_backbone`` fixes the FPN width at 256, so the backbone is built from the
  public ``BackboneWithFPN`` with a configurable width.
- Dense-head outputs are not returned in train mode; a temporary hook on ``head``
  captures them for logit-level KD (and one on ``transform`` the padded input size).
- The models are built by :mod:`detdistill.models.torchvision_detectors`, which needs
  torchvision only and is copied next to an exported student as its ``load_model.py``;
  this adapter adds config checks and detdistill's init choices on top.
- ``head`` / ``head_loss`` re-run the pieces of torchvision's ``forward`` (anchors, RPN
  proposals and region sampling for Faster R-CNN) on given features.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..config import ModelConfig
from ..models import pafpn
from ..models import torchvision_detectors as tvd
from ..modules import eval_mode, unwrap
from ..structures import Batch, Detections, RawOutputs, TwoStageOutputs
from ..taps import TapInfo, probe_tap_shapes
from .base import ADAPTERS, no_extra_inputs, no_options
from .export import onnx_export, write_export
from .weights import load_weights


def _spec(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The plain spec :func:`torchvision_detectors.build` takes (also written to ``model.json``)."""
    return {"framework": "torchvision", "arch": cfg.arch, "backbone": cfg.backbone, "fpn_channels": cfg.fpn_channels,
            "head_convs": cfg.head_convs, "norm": cfg.norm, "anchor_sizes": cfg.anchor_sizes, "num_classes": num_classes,
            "score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh, "detections_per_img": cfg.detections_per_img}


def _check(cfg: ModelConfig) -> None:
    """Config errors that name the key, before torchvision raises something less helpful."""
    if cfg.arch not in tvd.ARCHS:
        raise ValueError(f"model.arch {cfg.arch!r} is not a torchvision detector; choose one of {', '.join(tvd.ARCHS)}")
    if cfg.backbone not in tvd.BACKBONES:
        raise ValueError(f"model.backbone {cfg.backbone!r} is not supported; choose one of {', '.join(tvd.BACKBONES)}")
    if cfg.arch == "fcos" and cfg.fpn_channels % 32:
        raise ValueError(f"model.fpn_channels={cfg.fpn_channels}: torchvision's FCOS head uses GroupNorm(32), "
                         "so it must be a multiple of 32")
    if cfg.arch == "retinanet" and cfg.head_convs != 4:
        raise ValueError("model.head_convs: torchvision's RetinaNetHead has a fixed depth of 4")
    if cfg.arch == "yolo_pafpn":
        if cfg.anchor_sizes is not None:
            raise ValueError("model.anchor_sizes: yolo_pafpn uses one stride-sized point per location (8/16/32); remove it")
        if cfg.norm not in ("bn", "gn"):
            raise ValueError(f"model.norm={cfg.norm!r}: yolo_pafpn supports 'bn' or 'gn'")
    if cfg.reg_bias_init is not None and cfg.arch not in ("fcos", "yolo_pafpn"):
        raise ValueError(f"model.reg_bias_init applies to FCOS heads (fcos, yolo_pafpn), not {cfg.arch}")


def _build_arch(cfg: ModelConfig, num_classes: int) -> nn.Module:
    _check(cfg)
    model = tvd.build(_spec(cfg, num_classes))
    if isinstance(model, FCOS):
        _two_channels_per_group(model.head)
    if cfg.reg_bias_init is not None:
        nn.init.constant_(model.head.regression_head.bbox_reg.bias, cfg.reg_bias_init)
    return model


def _two_channels_per_group(head: nn.Module) -> None:
    """Halve the groups of any ``GroupNorm`` that has one channel per group (FCOS's fixed
    ``GroupNorm(32, C)`` at ``C = 32``).

    One channel per group is instance norm: on the 1x1 P7 map of a <=128 px image it has a
    single value per group, which torch rejects for a batch of one ("Expected more than 1
    value per channel") and which would normalise to the bias anyway. Parameter shapes do
    not change; ``C >= 64`` heads are left exactly as torchvision builds them.
    """
    for name, child in head.named_children():
        if isinstance(child, nn.GroupNorm) and child.num_groups == child.num_channels and child.num_channels > 1:
            gn = nn.GroupNorm(child.num_channels // 2, child.num_channels, eps=child.eps, affine=child.affine)
            if child.affine:
                gn.load_state_dict(child.state_dict())
            setattr(head, name, gn)
        else:
            _two_channels_per_group(child)


def _neck_levels(cfg_arch: str) -> list[tuple[str, str, int]]:
    """(public tap name, key in the FPN output dict, stride) per neck level."""
    if cfg_arch == "fasterrcnn":
        return [("neck.p2", "0", 4), ("neck.p3", "1", 8), ("neck.p4", "2", 16), ("neck.p5", "3", 32), ("neck.p6", "pool", 64)]
    if cfg_arch == "yolo_pafpn":
        return [("neck.p3", "0", 8), ("neck.p4", "1", 16), ("neck.p5", "2", 32)]
    return [("neck.p3", "0", 8), ("neck.p4", "1", 16), ("neck.p5", "2", 32), ("neck.p6", "p6", 64), ("neck.p7", "p7", 128)]


def _arch_of(model: nn.Module) -> str:
    model = unwrap(model)
    if isinstance(model, FasterRCNN):
        return "fasterrcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "yolo_pafpn" if hasattr(model.backbone, "neck") else "fcos"
    raise TypeError(f"not a torchvision detector built by detdistill: {type(model).__name__}")


class TorchvisionAdapter:
    """FCOS / RetinaNet / Faster R-CNN (and the PAFPN-FCOS YOLO-style detector) from torchvision parts."""

    name = "torchvision"

    def archs(self) -> list[str]:
        return list(tvd.ARCHS)

    def build(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        no_options(self.name, cfg)
        model = _build_arch(cfg, num_classes)
        if cfg.weights:
            load_weights(model, cfg.weights)
        return model

    # ---- taps -------------------------------------------------------------------
    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        model = unwrap(model)
        arch = _arch_of(model)
        names: list[tuple[str, str, str | None]] = []  # (tap, module, key)
        neck_module = "backbone.neck" if arch == "yolo_pafpn" else "backbone"
        for tap, key, _ in _neck_levels(arch):
            names.append((tap, neck_module, key))
        if arch == "yolo_pafpn":
            for i, lvl in enumerate((3, 4, 5)):
                names.append((f"fpn.p{lvl}", f"backbone.neck.fpn_outs.{i}", None))
                names.append((f"pan.p{lvl}", f"backbone.neck.pan_outs.{i}", None))
        for k in range(1, 5):
            if _has_module(model, f"backbone.body.layer{k}"):
                names.append((f"backbone.layer{k}", f"backbone.body.layer{k}", None))
        shapes = probe_tap_shapes(self, model, {tap: (module, key) for tap, module, key in names})
        return {tap: TapInfo(tap, module, key, *shapes[tap]) for tap, module, key in names if tap in shapes}

    # ---- forward passes ---------------------------------------------------------
    def _targets(self, model: nn.Module, batch: Batch) -> list[dict[str, Tensor]]:
        shift = 1 if isinstance(unwrap(model), FasterRCNN) else 0
        return [{"boxes": t.boxes, "labels": t.labels + shift} for t in batch.targets]

    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False,
                      extra_inputs: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], RawOutputs]:
        no_extra_inputs(self.name, extra_inputs)
        bare = unwrap(model)
        raw = RawOutputs()
        # Hooks see what torchvision does not return in train mode: the padded input
        # (transform) and, for logit KD, the head's outputs and the maps it consumed.
        def geometry(_m: nn.Module, _i: Any, out: tuple[ImageList, Any]) -> None:
            raw.input_size = tuple(out[0].tensors.shape[-2:])
            raw.image_sizes = [tuple(s) for s in out[0].image_sizes]

        def head_out(_m: nn.Module, args: tuple[Any, ...], out: dict[str, Tensor]) -> None:
            _fill_dense(raw, bare, list(args[0]), out)

        def rpn_out(_m: nn.Module, args: tuple[Any, ...], out: tuple[list[Tensor], list[Tensor]]) -> None:
            # two-stage: no dense class logits; the RPN's objectness and deltas are the dense part
            raw.features = list(args[0])
            objectness, deltas = concat_box_prediction_layers(list(out[0]), list(out[1]))
            n = len(raw.features[0])
            raw.two_stage = TwoStageOutputs(objectness.view(n, -1), deltas.view(n, -1, 4))

        handles = [bare.transform.register_forward_hook(geometry)]
        if need_raw:
            is_two_stage = isinstance(bare, FasterRCNN)
            handles.append(bare.rpn.head.register_forward_hook(rpn_out) if is_two_stage
                           else bare.head.register_forward_hook(head_out))
        try:
            losses = model(batch.images, self._targets(bare, batch))  # through DDP, so grads sync
        finally:
            for h in handles:
                h.remove()
        return dict(losses), raw

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        bare = unwrap(model)
        image_list, _ = bare.transform(images)
        feats = bare.backbone(image_list.tensors)
        raw = RawOutputs(input_size=tuple(image_list.tensors.shape[-2:]), image_sizes=[tuple(s) for s in image_list.image_sizes])
        if need_head:
            if isinstance(bare, FasterRCNN):
                raise ValueError("the Faster R-CNN teacher has no dense head for logit KD; use a feature method")
            maps = list(feats.values())
            _fill_dense(raw, bare, maps, bare.head(maps))
        return raw

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The ResNet body's parameters (not the FPN/PAFPN neck)."""
        return list(unwrap(model).backbone.body.parameters())

    def head(self, model: nn.Module, features: list[Tensor], raw: RawOutputs, batch: Batch | None = None) -> RawOutputs:
        """The detector's head on ``features`` (one map per neck level, as ``backbone`` returns them)."""
        bare = unwrap(model)
        if raw.input_size is None or raw.image_sizes is None:
            raise ValueError("head() needs the geometry of the input: pass the RawOutputs of forward_train/forward_features")
        out = RawOutputs(input_size=raw.input_size, image_sizes=raw.image_sizes)
        if isinstance(bare, FasterRCNN):
            out.two_stage = _two_stage_head(bare, features, raw, self._targets(bare, batch) if batch is not None else None)
            out.features = list(features)
            return out
        _fill_dense(out, bare, list(features), bare.head(list(features)))
        return out

    def head_loss(self, model: nn.Module, raw: RawOutputs, batch: Batch) -> dict[str, Tensor]:
        """torchvision's own loss of the head outputs: the same terms ``forward_train`` returns."""
        bare = unwrap(model)
        targets = self._targets(bare, batch)
        if isinstance(bare, FasterRCNN):
            return _two_stage_loss(bare, raw, targets)
        if raw.cls_logits is None or raw.box_preds is None or raw.features is None:
            raise ValueError("head_loss needs the dense outputs of head() (cls_logits, box_preds, features)")
        images = _image_list(raw, raw.features[0])
        anchors = bare.anchor_generator(images, raw.features)
        outputs = {"cls_logits": raw.cls_logits, "bbox_regression": raw.box_preds}
        if isinstance(bare, RetinaNet):
            return bare.compute_loss(targets, outputs, anchors)
        outputs["bbox_ctrness"] = raw.box_quality
        return bare.compute_loss(targets, outputs, anchors, [f.shape[-2] * f.shape[-1] for f in raw.features])

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        bare = unwrap(model)
        with eval_mode(bare):
            outs = bare(images)
        shift = 1 if isinstance(bare, FasterRCNN) else 0
        return [Detections(o["boxes"].float(), o["scores"].float(), o["labels"].long() - shift) for o in outs]

    # ---- export -----------------------------------------------------------------
    def export_onnx(self, model: nn.Module, out_path: Path, *, opset: int = 17) -> Path:
        """ONNX of the whole detector, post-processing included: input ``images`` ``(1, 3, H, W)``
        float RGB in [0, 1] (any H, W; one image a call, since outputs are per-image lists);
        outputs ``boxes`` ``(D, 4)`` xyxy px, ``scores`` ``(D,)``, ``labels`` ``(D,)`` class indices."""
        bare = copy.deepcopy(unwrap(model)).cpu().eval()
        example = torch.rand(1, 3, 128, 160)
        return onnx_export(_OneImage(bare), example, out_path, input_names=["images"],
                           output_names=["boxes", "scores", "labels"],
                           dynamic_axes={"images": {2: "height", 3: "width"}, "boxes": {0: "detections"},
                                         "scores": {0: "detections"}, "labels": {0: "detections"}}, opset=opset)

    def export(self, model: nn.Module, cfg: ModelConfig, num_classes: int, out_dir: Path, *,
               class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> Path:
        """``model.safetensors`` + ``model.json`` + ``load_model.py`` (torchvision-only loader)."""
        bare = unwrap(model)
        spec = _spec(cfg, num_classes)
        # GroupNorm groups are not in the state dict; the loader re-applies any that differ
        # from what plain torchvision builds (e.g. a 32-channel FCOS head: 16 groups).
        spec["group_norm_groups"] = {n: m.num_groups for n, m in bare.named_modules() if isinstance(m, nn.GroupNorm)}
        # The PAFPN neck is detdistill's own torch-only module: its source travels with the weights.
        companions = [pafpn] if cfg.arch == "yolo_pafpn" else []
        return write_export(bare, out_dir, spec, tvd, companions, class_names=class_names, category_ids=category_ids)


ADAPTERS.add("torchvision", TorchvisionAdapter())


class _OneImage(nn.Module):
    """A torchvision detector as a tensor-in, tensors-out module for tracing (one image)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.shift = 1 if isinstance(model, FasterRCNN) else 0  # label 0 is background there

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model([images[0]])[0]
        return out["boxes"], out["scores"], out["labels"] - self.shift


def _image_list(raw: RawOutputs, like: Tensor) -> ImageList:
    """An ImageList with the right geometry and no pixels (anchors only read shapes)."""
    assert raw.input_size is not None and raw.image_sizes is not None
    n = len(raw.image_sizes)
    return ImageList(like.new_empty((n, 0, *raw.input_size)), [tuple(s) for s in raw.image_sizes])


def _fill_dense(raw: RawOutputs, model: nn.Module, features: list[Tensor], out: dict[str, Tensor]) -> None:
    """Dense head outputs (FCOS / RetinaNet) into ``raw``."""
    raw.cls_logits = out["cls_logits"]
    raw.box_preds = out["bbox_regression"]
    raw.box_format = "retinanet_deltas" if isinstance(model, RetinaNet) else "fcos_ltrb"
    raw.box_quality = out.get("bbox_ctrness")
    raw.features = features
    if raw.input_size is not None:
        raw.strides = [raw.input_size[-1] // f.shape[-1] for f in features]


def _two_stage_head(model: FasterRCNN, features: list[Tensor], raw: RawOutputs,
                    targets: list[dict[str, Tensor]] | None) -> TwoStageOutputs:
    """RPN + region head on ``features``; with targets, regions are sampled as in training."""
    feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], features))
    images = _image_list(raw, features[0])
    rpn = model.rpn
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(images, features)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    labels = regression = None
    if targets is not None:
        boxes, _, labels, regression = model.roi_heads.select_training_samples(boxes, targets)
    pooled = model.roi_heads.box_head(model.roi_heads.box_roi_pool(feats, boxes, images.image_sizes))
    logits, box_deltas = model.roi_heads.box_predictor(pooled)
    n = len(anchors)
    return TwoStageOutputs(objectness.view(n, -1), deltas.view(n, -1, 4), anchors, boxes, logits, box_deltas, labels, regression)


def _two_stage_loss(model: FasterRCNN, raw: RawOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    ts = raw.two_stage
    if ts is None or ts.anchors is None or ts.roi_logits is None or ts.roi_deltas is None \
            or ts.roi_labels is None or ts.roi_regression_targets is None:
        raise ValueError("head_loss of Faster R-CNN needs head() run with the batch (sampled regions)")
    rpn = model.rpn
    labels, matched = rpn.assign_targets_to_anchors(ts.anchors, targets)
    reg_targets = rpn.box_coder.encode(matched, ts.anchors)
    loss_objectness, loss_rpn_box = rpn.compute_loss(ts.rpn_objectness.reshape(-1, 1), ts.rpn_deltas.reshape(-1, 4),
                                                     labels, reg_targets)
    loss_cls, loss_box = fastrcnn_loss(ts.roi_logits, ts.roi_deltas, ts.roi_labels, ts.roi_regression_targets)
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_objectness": loss_objectness,
            "loss_rpn_box_reg": loss_rpn_box}


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
