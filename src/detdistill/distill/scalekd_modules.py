"""ScaleKD's two training-only modules (Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in
Small Object Detector", CVPR 2023): scale-decoupled features (SDF) and the cross-scale assistant (CSA).

There is no public code; every open detail is a constructor argument, and the choices are
listed in ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScaleDecoupledFeatures(nn.Module):
    """Three residual branches ``x + conv1x1(conv3x3_d(conv1x1(x)))`` with dilation ``d`` = 1, 2, 3
    and **one** set of weights, each flattened by an MLP; the three embeddings are concatenated.

    ``(N, C, H, W) -> (N, 3 * embed_dim)``. Small dilations respond to small objects, large ones
    to large objects. To flatten maps of any size (and the teacher's larger maps at a 2x input)
    each branch is average-pooled to a ``grid x grid`` map first. The MLP is shared by the
    branches too (the paper shares the branch weights; sharing halves the parameters again).

    Args:
        channels: ``C`` of the (adapted) input map.
        hidden: width inside the 1x1 -> 3x3 -> 1x1 bottleneck.
        embed_dim: size of each branch's flattened embedding.
        grid: pooled spatial size before flattening.
        dilations: one per branch.
    """

    def __init__(self, channels: int, hidden: int = 64, embed_dim: int = 256, grid: int = 4,
                 dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.grid = grid
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.conv3x3 = nn.Conv2d(hidden, hidden, 3, padding=1)  # shared; dilation applied functionally
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels * grid * grid, embed_dim), nn.ReLU(inplace=True),
                                 nn.Linear(embed_dim, embed_dim))

    def branch(self, x: Tensor, dilation: int) -> Tensor:
        """One residual branch at ``dilation``: ``(N, C, H, W) -> (N, C, H, W)``."""
        h = F.relu(self.reduce(x))
        h = F.relu(F.conv2d(h, self.conv3x3.weight, self.conv3x3.bias, padding=dilation, dilation=dilation))
        return x + self.expand(h)

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.mlp(F.adaptive_avg_pool2d(self.branch(x, d), self.grid)) for d in self.dilations]
        return torch.cat(outs, dim=1)


class MultiScaleCrossAttention(nn.Module):
    """Cross-attention whose heads see keys and values downsampled at different rates ``r_i``.

    Per head ``i`` (``d_h = dim / heads``)::

        Q_i = q_src W_Q^i                       (N, H W, d_h)
        K_i = MSC(k_src, r_i) W_K^i             (N, H W / r_i^2, d_h)
        V_i = MSC(v_src, r_i) W_V^i;  V_i <- V_i + P(V_i)
        head_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i

    ``MSC(F, r)`` is an ``r x r`` average pool followed by a linear layer (the MLP); ``P`` is a
    depthwise 3x3 conv on ``V_i`` laid out as a map. Heads with a large ``r_i`` summarise large
    regions, heads with ``r_i = 1`` keep every small object, so large objects cannot take all
    of the attention. The heads are concatenated and projected back to ``dim``.

    Inputs are maps ``(N, C_*, H, W)`` of one spatial size; output ``(N, dim, H, W)``.
    """

    def __init__(self, q_channels: int, k_channels: int, v_channels: int, dim: int, rates: Sequence[int] = (1, 2, 4, 8)) -> None:
        super().__init__()
        if dim % len(rates):
            raise ValueError(f"CSA dim {dim} must be divisible by the number of heads {len(rates)}")
        self.rates = tuple(int(r) for r in rates)
        self.heads = len(self.rates)
        self.head_dim = dim // self.heads
        self.q = nn.Linear(q_channels, dim)
        self.k_msc = nn.ModuleList(nn.Linear(k_channels, self.head_dim) for _ in self.rates)
        self.v_msc = nn.ModuleList(nn.Linear(v_channels, self.head_dim) for _ in self.rates)
        self.pos = nn.ModuleList(nn.Conv2d(self.head_dim, self.head_dim, 3, padding=1, groups=self.head_dim)
                                 for _ in self.rates)
        self.out = nn.Linear(dim, dim)

    @staticmethod
    def _tokens(x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C)

    def attention_maps(self, q_src: Tensor, k_src: Tensor, v_src: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The output and each head's attention weights ``(N, H W, H W / r_i^2)`` (for tests and plots)."""
        n, _, h, w = q_src.shape
        q = self.q(self._tokens(q_src)).view(n, h * w, self.heads, self.head_dim)
        heads, weights = [], []
        for i, r in enumerate(self.rates):
            k_map = F.avg_pool2d(k_src, r, ceil_mode=True) if r > 1 else k_src
            v_map = F.avg_pool2d(v_src, r, ceil_mode=True) if r > 1 else v_src
            hk, wk = v_map.shape[-2:]
            k = self.k_msc[i](self._tokens(k_map))  # (N, L_i, d_h)
            v = self.v_msc[i](self._tokens(v_map))
            v_grid = v.transpose(1, 2).reshape(n, self.head_dim, hk, wk)
            v = v + self._tokens(self.pos[i](v_grid))  # V + P(V)
            att = torch.softmax(q[:, :, i] @ k.transpose(1, 2) / self.head_dim ** 0.5, dim=-1)
            heads.append(att @ v)
            weights.append(att)
        out = self.out(torch.cat(heads, dim=-1))  # (N, HW, dim)
        return out.transpose(1, 2).reshape(n, -1, h, w), weights

    def forward(self, q_src: Tensor, k_src: Tensor, v_src: Tensor) -> Tensor:
        return self.attention_maps(q_src, k_src, v_src)[0]


class CrossScaleAssistant(nn.Module):
    """One :class:`MultiScaleCrossAttention` per student pyramid level, refining the student map.

    ``refined_l = F_S^l + attention_l(Q, K, V)`` with the source of each of Q, K and V chosen
    by ``sources`` (``"s"`` student, ``"t"`` teacher). The default ``("s", "t", "s")`` is the
    seed's formulas (``Q = F_S W_Q``, ``K = MSC(F_T)``, ``V = MSC(F_S)``); ``("s", "t", "t")``
    is the third-party reading with keys and values from the teacher. The residual keeps the
    refined map in the student head's input space, so the student's own head can read it.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 rates: Sequence[int] = (1, 2, 4, 8), sources: tuple[str, str, str] = ("s", "t", "s")) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError("one teacher level per student level")
        if len(sources) != 3 or any(s not in ("s", "t") for s in sources):
            raise ValueError(f"CSA sources are three of 's' (student) / 't' (teacher) for Q, K, V; got {sources}")
        self.sources = tuple(sources)
        self.levels = nn.ModuleList()
        for cs, ct in zip(student_channels, teacher_channels):
            q, k, v = ((cs if src == "s" else ct) for src in self.sources)
            self.levels.append(MultiScaleCrossAttention(q, k, v, cs, rates))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> list[Tensor]:
        """Student maps and teacher maps (already at the student maps' sizes), level by level."""
        out = []
        for att, fs, ft in zip(self.levels, student, teacher):
            q, k, v = ((fs if src == "s" else ft) for src in self.sources)
            out.append(fs + att(q, k, v))
        return out
