"""Connectors that bring a student feature map to the teacher's shape."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Connector(nn.Module):
    """Optional 1x1 conv (+BN) for channels, then bilinear resize to the teacher's spatial size.

    Input ``(N, C_s, H_s, W_s)``, output ``(N, C_t, H_t, W_t)``. The resize is what lets teacher
    and student run at different strides or input resolutions. Connectors are training-only:
    they are never part of the exported student.
    """

    def __init__(self, in_channels: int, out_channels: int, *, mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "conv1x1", "conv1x1_bn", "none"):
            raise ValueError(f"connector mode {mode!r}; choose auto, conv1x1, conv1x1_bn or none")
        if mode == "none" and in_channels != out_channels and in_channels and out_channels:
            raise ValueError(f"connector 'none' but channels differ ({in_channels} vs {out_channels}); use auto or conv1x1")
        if mode == "auto":
            mode = "conv1x1" if in_channels != out_channels else "none"
        self.mode = mode
        if mode == "none":
            self.proj: nn.Module = nn.Identity()
        else:
            conv = nn.Conv2d(in_channels, out_channels, 1)
            self.proj = nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if mode == "conv1x1_bn" else conv

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.proj(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x
