"""Which feature-map cells a box covers, along one axis: the rule every box-to-map mask here shares.

A cell belongs to a box when its centre ``(i + 0.5) * stride`` lies inside the box. Along an axis
where a box covers no cell centre (an object thinner than one stride), the cell holding the box
centre is used instead, if that cell is on the map, so a small object never vanishes from a coarse
map. Used by MSSD's Gaussian masks and by the decoupled feature loss's foreground mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_axis_cells"]


def box_axis_cells(lo: Tensor, hi: Tensor, n_cells: int, stride: float) -> Tensor:
    """``(K,)`` box edges along one axis (input pixels) -> ``(K, n_cells)`` bool: the cells each box covers."""
    pos = (torch.arange(n_cells, device=lo.device, dtype=lo.dtype) + 0.5) * stride  # (n,) cell centres
    inside = (pos[None] >= lo[:, None]) & (pos[None] <= hi[:, None])  # (K, n)
    cell = torch.floor((lo + hi) / 2 / stride).long()
    fallback = ~inside.any(dim=1) & (cell >= 0) & (cell < n_cells)
    idx = torch.nonzero(fallback, as_tuple=True)[0]
    inside[idx, cell[idx]] = True
    return inside
