r"""Foreground / background-decoupled L2 feature imitation.

Whole-map imitation (L2, PKD, SSIM over an FPN map) averages over every position, and on
aerial images most positions are background: at stride 8 a 16-px car covers about 4 of a
crop's 1,024 cells. Decoupling the map into the ground-truth boxes' cells and the rest, each
averaged over its own count, lets the objects weigh what the config says rather than their
share of the area (the observation of Guo et al., "Distilling Object Detectors via Decoupled
Features", CVPR 2021, and Yang et al., FGD, CVPR 2022; the weights and normalisation here are
this project's, not either paper's):

.. math::
    d_{nhw} = \frac{1}{C} \sum_c (F^S_{nchw} - F^T_{nchw})^2, \qquad
    L = w_{fg} \frac{\sum M \odot d}{\max(\sum M, 1)}
      + w_{bg} \frac{\sum (1 - M) \odot d}{\max(\sum (1 - M), 1)}

with the sums over the batch and ``M`` the box mask of :func:`box_foreground_mask`. With
``w_bg = 0`` only the objects are imitated; a batch without objects then gives 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .box_cells import box_axis_cells
from .feature import _check_feature_pair

__all__ = ["box_foreground_mask", "decoupled_l2_loss", "DecoupledL2Loss"]


def box_foreground_mask(boxes: Sequence[Tensor], input_size: tuple[int, int], map_size: tuple[int, int]) -> Tensor:
    """``(N, h, w)`` bool mask of the map cells that belong to a ground-truth box.

    Args:
        boxes: per image, ``(G, 4)`` xyxy boxes in pixels of the (padded) network input.
        input_size: ``(H, W)`` of that input.
        map_size: ``(h, w)`` of the feature map; its stride per axis is ``H / h`` and ``W / w``.

    The cells of a box are those of :func:`~detdistill.losses.box_cells.box_axis_cells` on both axes
    (cell centre inside the box; an object thinner than one stride keeps the cell of its centre).
    """
    (H, W), (h, w) = input_size, map_size
    masks = []
    for b in boxes:
        mask = torch.zeros(h, w, dtype=torch.bool, device=b.device)
        if len(b):
            b = b.float()
            in_x = box_axis_cells(b[:, 0], b[:, 2], w, W / w)  # (G, w)
            in_y = box_axis_cells(b[:, 1], b[:, 3], h, H / h)  # (G, h)
            mask = (in_y[:, :, None] & in_x[:, None, :]).any(0)
        masks.append(mask)
    return torch.stack(masks)


def decoupled_l2_loss(student: Tensor, teacher: Tensor, foreground: Tensor, fg_weight: float = 1.0,
                      bg_weight: float = 1.0) -> Tensor:
    """The decoupled L2 of the module docstring: ``(N, C, H, W)`` maps and an ``(N, H, W)`` bool mask."""
    s, t = _check_feature_pair(student, teacher, four_d=True)
    if foreground.shape != (t.shape[0], *t.shape[-2:]):
        raise ValueError(f"foreground mask {tuple(foreground.shape)} does not fit maps {tuple(t.shape)}: "
                         "it must be (N, H, W)")
    d = (s - t).pow(2).mean(1)  # (N, H, W)
    fg = foreground.to(d.dtype)
    bg = 1.0 - fg
    fg_term = (d * fg).sum() / fg.sum().clamp(min=1.0)
    bg_term = (d * bg).sum() / bg.sum().clamp(min=1.0)
    return fg_weight * fg_term + bg_weight * bg_term


class DecoupledL2Loss(nn.Module):
    """Module form of :func:`decoupled_l2_loss`; the method builds the mask from the batch's boxes."""

    def __init__(self, fg_weight: float = 1.0, bg_weight: float = 1.0) -> None:
        super().__init__()
        if fg_weight < 0 or bg_weight < 0 or fg_weight + bg_weight == 0:
            raise ValueError(f"fg_weight and bg_weight must be >= 0 and not both 0, got {fg_weight}, {bg_weight}")
        self.fg_weight, self.bg_weight = float(fg_weight), float(bg_weight)

    def forward(self, student: Tensor, teacher: Tensor, foreground: Tensor) -> Tensor:
        return decoupled_l2_loss(student, teacher, foreground, self.fg_weight, self.bg_weight)

    def extra_repr(self) -> str:
        return f"fg_weight={self.fg_weight}, bg_weight={self.bg_weight}"
