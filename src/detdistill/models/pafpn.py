"""A YOLOv5-style PAFPN neck (FPN top-down, then PAN bottom-up) and an FCOS detector on it.

The neck exists for MSSD (Jia et al., "MSSD: multi-scale self-distillation for object
detection", Visual Intelligence 2024): the FPN map at each scale teaches the deeper PAN map
at the same scale. That needs both maps to have the same shape and to be the output of a
hookable submodule, so the neck exposes

* ``fpn_outs.0/1/2``: top-down (FPN) maps at strides 8/16/32, ``out_channels`` each;
* ``pan_outs.0/1/2``: bottom-up (PAN) maps at strides 8/16/32, ``out_channels`` each
  (these are what the detection head consumes).

Deviation from YOLOv5: there, the stride-8 PAN output *is* the last FPN block (the PAN path
starts from it), so an FPN->PAN pair at stride 8 would be the same tensor. Here
``pan_outs.0`` is an extra C3 block on top of ``fpn_outs.0`` so every scale has a distinct,
deeper student. All levels use one channel width (``out_channels``), as the FCOS head
shares its convolutions across levels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormKind = Literal["bn", "gn"]

__all__ = [
    "ConvNormAct",
    "Bottleneck",
    "C3Block",
    "PAFPN",
    "BackboneWithPAFPN",
    "build_yolo_pafpn_fcos",
]


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # Largest group count <= 32 that divides the width, so any channel count works.
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', got {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm/GroupNorm -> SiLU; ``(N, C_in, H, W) -> (N, C_out, H/s, W/s)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, norm: NormKind = "bn") -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
            _norm(norm, out_ch),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    """1x1 then 3x3 ConvNormAct, with an optional identity shortcut; shape-preserving."""

    def __init__(self, channels: int, shortcut: bool = False, norm: NormKind = "bn") -> None:
        super().__init__()
        self.cv1 = ConvNormAct(channels, channels, 1, norm=norm)
        self.cv2 = ConvNormAct(channels, channels, 3, norm=norm)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C3Block(nn.Module):
    """CSP block (YOLOv5 "C3"): two 1x1 branches, bottlenecks on one, concat, 1x1 fuse.

    ``(N, C_in, H, W) -> (N, C_out, H, W)``. The hidden width is ``C_out // 2`` (at least 1).
    The neck uses ``shortcut=False``, as YOLOv5's neck does.
    """

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int = 1, shortcut: bool = False, norm: NormKind = "bn") -> None:
        super().__init__()
        hidden = max(out_ch // 2, 1)
        self.cv1 = ConvNormAct(in_ch, hidden, 1, norm=norm)
        self.cv2 = ConvNormAct(in_ch, hidden, 1, norm=norm)
        self.m = nn.Sequential(*(Bottleneck(hidden, shortcut, norm) for _ in range(num_blocks)))
        self.cv3 = ConvNormAct(2 * hidden, out_ch, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


def _resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """Nearest-resize ``x`` to ``ref``'s spatial size (no-op when they already match).

    Upsampling by exactly 2 fails for odd sizes (ResNet rounds up at each stride), so the
    top-down path resizes to the lateral map's size instead of using a fixed factor.
    """
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class PAFPN(nn.Module):
    """YOLOv5-style PAFPN over three backbone levels (strides 8/16/32).

    Data flow (``c = out_channels``, ``C3``/``C4``/``C5`` the inputs ``'0'``/``'1'``/``'2'``)::

        F5 = fpn_outs.2(C5)                               # 1x1 ConvNormAct, stride 32
        F4 = fpn_outs.1(cat(up(F5), C4))                  # C3 block, stride 16
        F3 = fpn_outs.0(cat(up(F4), C3))                  # C3 block, stride 8
        P3 = pan_outs.0(F3)                               # C3 block, stride 8
        P4 = pan_outs.1(cat(downs.0(P3), F4))             # C3 block, stride 16
        P5 = pan_outs.2(cat(downs.1(P4), F5))             # C3 block, stride 32

    Every ``F_l`` and ``P_l`` has exactly ``c`` channels, so ``F_l`` can teach ``P_l``.

    Args:
        in_channels: channels of the three backbone maps, finest first.
        out_channels: width of every FPN and PAN map.
        num_blocks: bottlenecks per C3 block.
        norm: ``'bn'`` (BatchNorm2d) or ``'gn'`` (GroupNorm).
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_blocks: int = 1, norm: NormKind = "bn") -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"PAFPN takes exactly 3 backbone levels, got in_channels={in_channels}")
        c = out_channels
        c3, c4, c5 = in_channels
        self.in_channels = list(in_channels)
        self.out_channels = c
        self.strides = [8, 16, 32]
        # Top-down: the coarsest FPN map is a lateral 1x1 (YOLOv5's layer after SPPF).
        self.fpn_outs = nn.ModuleList(
            [
                C3Block(c + c3, c, num_blocks, norm=norm),
                C3Block(c + c4, c, num_blocks, norm=norm),
                ConvNormAct(c5, c, 1, norm=norm),
            ]
        )
        # Bottom-up: stride-2 3x3 convs, then C3 fusion with the same-scale FPN map.
        self.downs = nn.ModuleList([ConvNormAct(c, c, 3, 2, norm=norm) for _ in range(2)])
        self.pan_outs = nn.ModuleList(
            [
                C3Block(c, c, num_blocks, norm=norm),
                C3Block(2 * c, c, num_blocks, norm=norm),
                C3Block(2 * c, c, num_blocks, norm=norm),
            ]
        )

    def forward(self, x: "OrderedDict[str, Tensor] | dict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """Args: ``x`` with keys ``'0','1','2'``: ``(N, in_channels[l], H/s_l, W/s_l)``.

        Returns: ``OrderedDict`` with keys ``'0','1','2'``: the PAN maps ``(N, out_channels, H/s_l, W/s_l)``.
        """
        c3, c4, c5 = x["0"], x["1"], x["2"]
        f5 = self.fpn_outs[2](c5)
        f4 = self.fpn_outs[1](torch.cat([_resize_to(f5, c4), c4], dim=1))
        f3 = self.fpn_outs[0](torch.cat([_resize_to(f4, c3), c3], dim=1))
        p3 = self.pan_outs[0](f3)
        p4 = self.pan_outs[1](torch.cat([_resize_to(self.downs[0](p3), f4), f4], dim=1))
        p5 = self.pan_outs[2](torch.cat([_resize_to(self.downs[1](p4), f5), f5], dim=1))
        return OrderedDict([("0", p3), ("1", p4), ("2", p5)])


class BackboneWithPAFPN(nn.Module):
    """``body`` (returns ``'0','1','2'`` at strides 8/16/32) followed by a :class:`PAFPN` ``neck``.

    Exposes ``out_channels`` as torchvision detection heads expect. Tap paths inside a
    torchvision detector: ``backbone.neck.fpn_outs.{0,1,2}`` and ``backbone.neck.pan_outs.{0,1,2}``.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels_list: list[int],
        out_channels: int,
        num_blocks: int = 1,
        norm: NormKind = "bn",
    ) -> None:
        super().__init__()
        self.body = body
        self.neck = PAFPN(in_channels_list, out_channels, num_blocks=num_blocks, norm=norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """``(N, 3, H, W)`` -> ``OrderedDict`` ``'0','1','2'`` of ``(N, out_channels, ceil(H/s), ceil(W/s))``."""
        return self.neck(self.body(x))


_RESNET_CHANNELS: dict[str, list[int]] = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
}


def build_yolo_pafpn_fcos(
    backbone: str,
    num_classes: int,
    neck_channels: int = 64,
    head_convs: int = 2,
    num_blocks: int = 1,
    norm: NormKind = "bn",
    **kwargs: Any,
) -> nn.Module:
    """A torchvision ``FCOS`` on a randomly initialised ResNet + :class:`PAFPN` (3 levels).

    Args:
        backbone: ``'resnet18'``, ``'resnet34'`` or ``'resnet50'`` (``weights=None``; trainable BatchNorm, or
            GroupNorm(32) with ``norm='gn'``).
        num_classes: number of foreground classes as the FCOS head sees them.
        neck_channels: PAFPN width; must be a multiple of 32 (FCOSHead uses ``GroupNorm(32, C)``).
        head_convs: conv depth of each FCOS head branch.
        num_blocks: bottlenecks per C3 block in the neck.
        norm: normalisation of the ResNet body and the neck, ``'bn'`` or ``'gn'``.
        **kwargs: passed to ``FCOS`` (e.g. ``min_size``, ``max_size``, ``score_thresh``,
            ``image_mean``/``image_std``), so the caller controls the internal resize.

    Returns:
        ``torchvision.models.detection.FCOS`` whose ``backbone`` is a :class:`BackboneWithPAFPN`.
    """
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    if backbone not in _RESNET_CHANNELS:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {sorted(_RESNET_CHANNELS)}")
    if neck_channels % 32:
        raise ValueError(f"neck_channels must be a multiple of 32 (FCOSHead GroupNorm), got {neck_channels}")
    body_norm = nn.BatchNorm2d if norm == "bn" else (lambda c: nn.GroupNorm(32, c))
    resnet = getattr(torchvision.models, backbone)(weights=None, norm_layer=body_norm)
    body = IntermediateLayerGetter(resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
    bb = BackboneWithPAFPN(body, _RESNET_CHANNELS[backbone], neck_channels, num_blocks=num_blocks, norm=norm)
    # FCOS: one stride-sized "anchor" per location, used only to get point centres and strides.
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(neck_channels, num_anchors=1, num_classes=num_classes, num_convs=head_convs)
    return FCOS(bb, num_classes=num_classes, anchor_generator=anchors, head=head, **kwargs)
