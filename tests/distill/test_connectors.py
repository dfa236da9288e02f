"""Connectors: 1x1 conv for channels, bilinear resize to the teacher's spatial size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detdistill.distill.connectors import Connector


def test_channels_differ_gives_1x1_conv():
    torch.manual_seed(0)
    conn = Connector(32, 64)
    assert conn.mode == "conv1x1"
    conv = conn.proj
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (32, 64, (1, 1))
    x = torch.randn(2, 32, 12, 16)
    y = conn(x, (12, 16))
    assert y.shape == (2, 64, 12, 16)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias))


def test_conv1x1_bn_mode():
    conn = Connector(32, 64, mode="conv1x1_bn")
    assert isinstance(conn.proj, nn.Sequential)
    assert isinstance(conn.proj[0], nn.Conv2d) and isinstance(conn.proj[1], nn.BatchNorm2d)
    assert conn(torch.randn(2, 32, 6, 8), (6, 8)).shape == (2, 64, 6, 8)


@pytest.mark.parametrize("src,dst", [((6, 8), (12, 16)), ((24, 32), (12, 16)), ((5, 7), (12, 16))])
def test_spatial_differ_resizes_bilinearly_to_teacher_size(src, dst):
    torch.manual_seed(0)
    conn = Connector(32, 32)
    assert conn.mode == "none" and isinstance(conn.proj, nn.Identity)
    x = torch.randn(2, 32, *src)
    y = conn(x, dst)
    assert y.shape == (2, 32, *dst)
    torch.testing.assert_close(y, F.interpolate(x, size=dst, mode="bilinear", align_corners=False))


def test_channels_and_spatial_differ_project_then_resize():
    torch.manual_seed(0)
    conn = Connector(32, 64)
    x = torch.randn(2, 32, 6, 8)
    y = conn(x, torch.Size([12, 16]))  # the Distiller passes teacher.shape[-2:]
    expected = F.interpolate(F.conv2d(x, conn.proj.weight, conn.proj.bias), size=(12, 16), mode="bilinear", align_corners=False)
    assert y.shape == (2, 64, 12, 16)
    torch.testing.assert_close(y, expected)


def test_same_shape_is_identity():
    conn = Connector(32, 32)
    x = torch.randn(2, 32, 12, 16)
    assert conn(x, (12, 16)) is x
    assert not list(conn.parameters())


def test_none_with_different_channels_raises():
    with pytest.raises(ValueError, match=r"channels differ \(32 vs 64\)"):
        Connector(32, 64, mode="none")
    assert isinstance(Connector(64, 64, mode="none").proj, nn.Identity)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="connector mode"):
        Connector(32, 64, mode="conv3x3")


def test_gradient_reaches_connector_and_input():
    conn = Connector(32, 64)
    x = torch.randn(2, 32, 6, 8, requires_grad=True)
    conn(x, (12, 16)).square().mean().backward()
    assert conn.proj.weight.grad is not None and conn.proj.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
