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
  captures them for logit-level KD.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..config import ModelConfig
from ..models.pafpn import build_yolo_pafpn_fcos
from ..structures import Batch, Detections, RawOutputs, TapInfo
from .base import ADAPTERS, probe_tap_shapes, unwrap
from .weights import load_weights

_BACKBONES = ("resnet18", "resnet34", "resnet50")
_ARCHS = ("fcos", "retinanet", "fasterrcnn", "yolo_pafpn")


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32, but never resize: the data pipeline owns the scale."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    return lambda c: nn.GroupNorm(32, c)


def _resnet(name: str, norm: str) -> nn.Module:
    if name not in _BACKBONES:
        raise ValueError(f"model.backbone {name!r} is not supported; choose one of {', '.join(_BACKBONES)}")
    # weights=None: random init. Pretrained weights come only from model.weights (a local file).
    return getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm))


def _stage_channels(name: str) -> list[int]:
    """Output channels of layer1..layer4."""
    return [256, 512, 1024, 2048] if name == "resnet50" else [64, 128, 256, 512]


def _fpn_backbone(cfg: ModelConfig, returned: list[int], extra: nn.Module) -> BackboneWithFPN:
    body = _resnet(cfg.backbone, cfg.norm)
    chans = _stage_channels(cfg.backbone)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
        in_channels_list=[chans[k - 1] for k in returned],
        out_channels=cfg.fpn_channels,
        extra_blocks=extra,
    )


def _common_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return dict(min_size=800, max_size=1333, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)


def _build_arch(cfg: ModelConfig, num_classes: int) -> nn.Module:
    w = cfg.fpn_channels
    if cfg.arch == "fcos":
        if w % 32:
            raise ValueError(f"model.fpn_channels={w}: torchvision's FCOS head uses GroupNorm(32), so it must be a multiple of 32")
        sizes = cfg.anchor_sizes or [8, 16, 32, 64, 128]
        model: nn.Module = FCOS(
            _fpn_backbone(cfg, [2, 3, 4], LastLevelP6P7(w, w)),
            num_classes,
            anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes)),
            head=FCOSHead(w, 1, num_classes, num_convs=cfg.head_convs),
            detections_per_img=cfg.detections_per_img,
            **_common_kwargs(cfg),
        )
    elif cfg.arch == "retinanet":
        if cfg.head_convs != 4:
            raise ValueError("model.head_convs: torchvision's RetinaNetHead has a fixed depth of 4")
        sizes = cfg.anchor_sizes or [32, 64, 128, 256, 512]
        anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        model = RetinaNet(
            _fpn_backbone(cfg, [2, 3, 4], LastLevelP6P7(w, w)),
            num_classes,
            anchor_generator=anchors,
            head=RetinaNetHead(w, anchors.num_anchors_per_location()[0], num_classes),
            detections_per_img=cfg.detections_per_img,
            **_common_kwargs(cfg),
        )
    elif cfg.arch == "fasterrcnn":
        sizes = cfg.anchor_sizes or [32, 64, 128, 256, 512]
        model = FasterRCNN(
            _fpn_backbone(cfg, [1, 2, 3, 4], LastLevelMaxPool()),
            num_classes + 1,  # torchvision reserves label 0 for background
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes)),
            box_detections_per_img=cfg.detections_per_img,
            min_size=800, max_size=1333, box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
        )
    elif cfg.arch == "yolo_pafpn":
        if cfg.anchor_sizes is not None:
            raise ValueError("model.anchor_sizes: yolo_pafpn uses one stride-sized point per location (8/16/32); remove it")
        if cfg.norm not in ("bn", "gn"):
            raise ValueError(f"model.norm={cfg.norm!r}: yolo_pafpn supports 'bn' or 'gn'")
        model = build_yolo_pafpn_fcos(cfg.backbone, num_classes, neck_channels=w, head_convs=cfg.head_convs, norm=cfg.norm,
                                      detections_per_img=cfg.detections_per_img, **_common_kwargs(cfg))
    else:
        raise ValueError(f"model.arch {cfg.arch!r} is not a torchvision detector; choose one of {', '.join(_ARCHS)}")
    if isinstance(model, FCOS):
        _two_channels_per_group(model.head)
    if cfg.reg_bias_init is not None:
        if not isinstance(model, FCOS):
            raise ValueError(f"model.reg_bias_init applies to FCOS heads (fcos, yolo_pafpn), not {cfg.arch}")
        nn.init.constant_(model.head.regression_head.bbox_reg.bias, cfg.reg_bias_init)
    old = model.transform
    model.transform = NativeResolutionTransform(old.min_size, old.max_size, old.image_mean, old.image_std)
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
        return list(_ARCHS)

    def build(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        model = _build_arch(cfg, num_classes)
        if cfg.weights:
            load_weights(model, cfg.weights)
        return model

    # ---- taps -------------------------------------------------------------------
    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        model = unwrap(model)
        arch = _arch_of(model)
        names: list[tuple[str, str, str | None]] = []  # (tap, module, key)
        neck_module = "backbone" if arch != "yolo_pafpn" else "backbone.neck"
        for tap, key, _ in _neck_levels(arch):
            names.append((tap, "backbone" if arch != "yolo_pafpn" else neck_module, key))
        if arch == "yolo_pafpn":
            for i, lvl in enumerate((3, 4, 5)):
                names.append((f"fpn.p{lvl}", f"backbone.neck.fpn_outs.{i}", None))
                names.append((f"pan.p{lvl}", f"backbone.neck.pan_outs.{i}", None))
        body = "backbone.body"
        for k in range(1, 5):
            if _has_module(model, f"{body}.layer{k}"):
                names.append((f"backbone.layer{k}", f"{body}.layer{k}", None))
        shapes = probe_tap_shapes(self, model, {tap: (module, key) for tap, module, key in names})
        return {tap: TapInfo(tap, module, key, *shapes[tap]) for tap, module, key in names}

    # ---- forward passes ---------------------------------------------------------
    def _targets(self, model: nn.Module, batch: Batch) -> list[dict[str, Tensor]]:
        shift = 1 if isinstance(unwrap(model), FasterRCNN) else 0
        return [{"boxes": t.boxes, "labels": t.labels + shift} for t in batch.targets]

    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False) -> tuple[dict[str, Tensor], RawOutputs]:
        bare = unwrap(model)
        raw = RawOutputs()
        handle = None
        if need_raw:
            if isinstance(bare, FasterRCNN):
                raise ValueError("Faster R-CNN has no dense class logits for logit KD; use a feature method, or a FCOS/RetinaNet student")

            def grab(_m: nn.Module, _i: Any, out: dict[str, Tensor]) -> None:
                raw.cls_logits = out["cls_logits"]

            handle = bare.head.register_forward_hook(grab)
        try:
            losses = model(batch.images, self._targets(bare, batch))  # through DDP, so grads sync
        finally:
            if handle is not None:
                handle.remove()
        return dict(losses), raw

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        bare = unwrap(model)
        image_list, _ = bare.transform(images)
        feats = bare.backbone(image_list.tensors)
        raw = RawOutputs(extra={"image_sizes": image_list.image_sizes})
        if need_head:
            if isinstance(bare, FasterRCNN):
                raise ValueError("the Faster R-CNN teacher has no dense head for logit KD; use a feature method")
            raw.cls_logits = bare.head(list(feats.values()))["cls_logits"]
        return raw

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        bare = unwrap(model)
        was_training = bare.training
        bare.eval()
        try:
            outs = bare(images)
        finally:
            bare.train(was_training)
        shift = 1 if isinstance(bare, FasterRCNN) else 0
        return [Detections(o["boxes"].float(), o["scores"].float(), o["labels"].long() - shift) for o in outs]

    # ---- export -----------------------------------------------------------------
    def export(self, model: nn.Module, cfg: ModelConfig, num_classes: int, out_dir: Path) -> Path:
        """``model.safetensors`` + ``model.json`` + ``load_model.py`` (torchvision-only loader)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        bare = unwrap(model)
        state = {k: v.detach().cpu().contiguous() for k, v in bare.state_dict().items()}
        weights = out_dir / "model.safetensors"
        save_file(state, str(weights), metadata={"format": "pt", "framework": "torchvision", "arch": cfg.arch})
        spec = {"framework": "torchvision", "arch": cfg.arch, "backbone": cfg.backbone, "fpn_channels": cfg.fpn_channels,
                "head_convs": cfg.head_convs, "norm": cfg.norm, "anchor_sizes": cfg.anchor_sizes,
                "num_classes": num_classes, "score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh,
                "detections_per_img": cfg.detections_per_img,
                # GroupNorm groups are not in the state dict; the loader re-applies any that differ
                # from what plain torchvision builds (e.g. a 32-channel FCOS head: 16 groups).
                "group_norm_groups": {n: m.num_groups for n, m in bare.named_modules() if isinstance(m, nn.GroupNorm)}}
        (out_dir / "model.json").write_text(json.dumps(spec, indent=2))
        (out_dir / "load_model.py").write_text(_STANDALONE_LOADER)
        if cfg.arch == "yolo_pafpn":
            # The PAFPN neck is detdistill's own module; it depends on torch/torchvision only,
            # so its source travels with the weights and the loader needs no detdistill.
            import inspect

            from ..models import pafpn

            (out_dir / "pafpn.py").write_text(inspect.getsource(pafpn))
        return weights


ADAPTERS.add("torchvision", TorchvisionAdapter())


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


# Written next to every exported torchvision student: loads it with torch + torchvision only.
_STANDALONE_LOADER = '''"""Load this exported student with torch + torchvision only (no detdistill needed).

    python load_model.py   # builds the model and loads model.safetensors (strict)
"""
import json
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7


def build(spec):
    if spec["arch"] == "yolo_pafpn":  # ResNet + PAFPN neck (pafpn.py, shipped beside this file) + FCOS head
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pafpn import build_yolo_pafpn_fcos
        return build_yolo_pafpn_fcos(spec["backbone"], spec["num_classes"], neck_channels=spec["fpn_channels"],
                                     head_convs=spec["head_convs"], norm=spec.get("norm", "bn"), score_thresh=spec["score_thresh"],
                                     nms_thresh=spec["nms_thresh"], detections_per_img=spec["detections_per_img"],
                                     min_size=800, max_size=1333)
    norm = {"bn": torch.nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}.get(spec["norm"], lambda c: torch.nn.GroupNorm(32, c))
    body = getattr(torchvision.models, spec["backbone"])(weights=None, norm_layer=norm)
    chans = [256, 512, 1024, 2048] if spec["backbone"] == "resnet50" else [64, 128, 256, 512]
    w, arch, n = spec["fpn_channels"], spec["arch"], spec["num_classes"]
    layers = [1, 2, 3, 4] if arch == "fasterrcnn" else [2, 3, 4]
    extra = LastLevelMaxPool() if arch == "fasterrcnn" else LastLevelP6P7(w, w)
    backbone = BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(layers)}, [chans[k - 1] for k in layers], w, extra)
    common = dict(min_size=800, max_size=1333)  # unused: load() installs a no-resize transform
    if arch == "fcos":
        sizes = spec["anchor_sizes"] or [8, 16, 32, 64, 128]
        return FCOS(backbone, n, anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes)),
                    head=FCOSHead(w, 1, n, num_convs=spec["head_convs"]), score_thresh=spec["score_thresh"],
                    nms_thresh=spec["nms_thresh"], detections_per_img=spec["detections_per_img"], **common)
    if arch == "retinanet":
        sizes = spec["anchor_sizes"] or [32, 64, 128, 256, 512]
        anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, n, anchor_generator=anchors, head=RetinaNetHead(w, 9, n), score_thresh=spec["score_thresh"],
                         nms_thresh=spec["nms_thresh"], detections_per_img=spec["detections_per_img"], **common)
    sizes = spec["anchor_sizes"] or [32, 64, 128, 256, 512]
    return FasterRCNN(backbone, n + 1, rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes)),
                      box_score_thresh=spec["score_thresh"], box_nms_thresh=spec["nms_thresh"],
                      box_detections_per_img=spec["detections_per_img"], **common)  # label 0 = background


class NativeResolution(GeneralizedRCNNTransform):
    """The model was trained at native resolution: normalise and pad, but never resize."""

    def resize(self, image, target=None):
        return image, target


def set_group_norm_groups(model, groups):
    """GroupNorm group counts are not stored in the weights: rebuild those that differ."""
    for name, g in groups.items():
        old = model.get_submodule(name)
        if old.num_groups != g:
            parent, _, attr = name.rpartition(".")
            new = torch.nn.GroupNorm(g, old.num_channels, eps=old.eps, affine=old.affine)
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def load(folder="."):
    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    model = build(spec)
    set_group_norm_groups(model, spec.get("group_norm_groups", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    t = model.transform  # same normalisation and padding as in training, without torchvision's resize
    model.transform = NativeResolution(t.min_size, t.max_size, t.image_mean, t.image_std)
    return model.eval()


if __name__ == "__main__":
    print(type(load(Path(__file__).parent)).__name__, "loaded")
'''
