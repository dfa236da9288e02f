"""torchvision detectors from a plain spec dict; also the exported students' ``load_model.py``.

This file depends on torch, torchvision and safetensors only (and, for ``yolo_pafpn``, on
``pafpn.py`` beside it). detdistill's torchvision adapter builds every model through
:func:`build`, and ``detdistill export`` copies this very file next to the weights as
``load_model.py``: the exported student is rebuilt by the same code that trained it,
without detdistill installed::

    python load_model.py            # builds the model from model.json, loads model.safetensors (strict)

    from load_model import load     # in your code: a torchvision detector in eval mode
    model = load("path/to/export")

The spec (``model.json``) keys: ``arch`` (fcos, retinanet, fasterrcnn, yolo_pafpn),
``backbone`` (resnet18/34/50), ``fpn_channels``, ``head_convs``, ``norm`` (bn, frozen_bn,
gn), ``anchor_sizes`` (or null), ``num_classes``, ``score_thresh``, ``nms_thresh``,
``detections_per_img`` and, optionally, ``group_norm_groups``.

The models run at native resolution: :class:`NativeResolution` normalises and pads to a
multiple of 32 but never resizes, as in training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

ARCHS = ("fcos", "retinanet", "fasterrcnn", "yolo_pafpn")
BACKBONES = ("resnet18", "resnet34", "resnet50")
DEFAULT_ANCHOR_SIZES = {"fcos": [8, 16, 32, 64, 128], "retinanet": [32, 64, 128, 256, 512],
                        "fasterrcnn": [32, 64, 128, 256, 512]}


class NativeResolution(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32, but never resize: the data pipeline owns the scale."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    return lambda c: nn.GroupNorm(32, c)


def stage_channels(backbone: str) -> list[int]:
    """Output channels of ResNet layer1..layer4."""
    return [256, 512, 1024, 2048] if backbone == "resnet50" else [64, 128, 256, 512]


def _fpn_backbone(spec: dict[str, Any], layers: list[int], extra: nn.Module) -> BackboneWithFPN:
    # weights=None: random init; trained weights come from a file, never a download.
    body = getattr(torchvision.models, spec["backbone"])(weights=None, norm_layer=norm_layer(spec["norm"]))
    chans = stage_channels(spec["backbone"])
    return BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(layers)}, [chans[k - 1] for k in layers],
                           spec["fpn_channels"], extra)


def _pafpn_builder() -> Callable[..., nn.Module]:
    if __package__:  # inside the detdistill package
        from .pafpn import build_yolo_pafpn_fcos
    else:  # an exported student: pafpn.py lies beside this file
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pafpn import build_yolo_pafpn_fcos  # type: ignore[no-redef]
    return build_yolo_pafpn_fcos


def build(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised detector for ``spec`` (see the module docstring), at native resolution."""
    arch, n, w = spec["arch"], spec["num_classes"], spec["fpn_channels"]
    sizes = spec.get("anchor_sizes") or DEFAULT_ANCHOR_SIZES.get(arch)
    post = dict(score_thresh=spec["score_thresh"], nms_thresh=spec["nms_thresh"], detections_per_img=spec["detections_per_img"])
    common = dict(min_size=800, max_size=1333)  # unused: the no-resize transform replaces torchvision's
    if arch == "fcos":
        model: nn.Module = FCOS(
            _fpn_backbone(spec, [2, 3, 4], LastLevelP6P7(w, w)), n,
            anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes)),
            head=FCOSHead(w, 1, n, num_convs=spec["head_convs"]), **post, **common)
    elif arch == "retinanet":
        anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                                  ((0.5, 1.0, 2.0),) * len(sizes))
        model = RetinaNet(_fpn_backbone(spec, [2, 3, 4], LastLevelP6P7(w, w)), n, anchor_generator=anchors,
                          head=RetinaNetHead(w, anchors.num_anchors_per_location()[0], n), **post, **common)
    elif arch == "fasterrcnn":
        model = FasterRCNN(_fpn_backbone(spec, [1, 2, 3, 4], LastLevelMaxPool()), n + 1,  # label 0 = background
                           rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes)),
                           box_detections_per_img=spec["detections_per_img"], box_score_thresh=spec["score_thresh"],
                           box_nms_thresh=spec["nms_thresh"], **common)
    elif arch == "yolo_pafpn":  # ResNet + YOLO-style PAFPN neck + FCOS head
        model = _pafpn_builder()(spec["backbone"], n, neck_channels=w, head_convs=spec["head_convs"],
                                 norm=spec.get("norm", "bn"), **post, **common)
    else:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    t = model.transform
    model.transform = NativeResolution(t.min_size, t.max_size, t.image_mean, t.image_std)
    set_group_norm_groups(model, spec.get("group_norm_groups") or {})
    return model


def set_group_norm_groups(model: nn.Module, groups: dict[str, int]) -> None:
    """GroupNorm group counts are not stored in the weights: rebuild those that differ."""
    for name, g in groups.items():
        old = model.get_submodule(name)
        if old.num_groups != g:
            parent, _, attr = name.rpartition(".")
            new = nn.GroupNorm(g, old.num_channels, eps=old.eps, affine=old.affine)
            if old.affine:
                new.load_state_dict(old.state_dict())
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def load(folder: str | Path = ".") -> nn.Module:
    """The exported student in ``folder`` (``model.json`` + ``model.safetensors``), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    model = build(spec)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


if __name__ == "__main__":
    print(type(load(Path(__file__).parent)).__name__, "loaded")
