"""MSSD: multi-scale self-distillation losses.

Jia, Z., Sun, S., Liu, G. et al., "MSSD: multi-scale self-distillation for object
detection", Visual Intelligence 2, 8 (2024), doi:10.1007/s44267-024-00040-3.

No teacher network: inside a PAFPN neck the top-down FPN map ``F_l`` at scale ``l`` teaches
the deeper bottom-up PAN map ``P_l`` at the same scale. A Gaussian foreground mask ``M_l``
(see :mod:`detdistill.losses.gaussian_mask`) is (a) the target of an auxiliary MSE through a
per-scale adaptation layer ``A_l`` and (b) optionally a weight that focuses the
self-distillation on objects::

    L_self = sum_l  w_l * sum_{n,c,h,w} M_l (P_l - sg(F_l))^2 / (C * Z_l)
    L_mask = lambda * sum_l  mean_{n,h,w} (sigmoid(A_l(P_l)) - M_l)^2

with ``Z_l = N * H_l * W_l`` (``weighting_mean="map"``, the default: the mean over the whole map,
background counted as zero) or ``Z_l = sum_{n,h,w} M_l + eps`` (``"mask"``: the mean over the objects,
as first shipped; on small objects it multiplies the term's gradient, see :data:`WeightingMean`).

``sg`` is stop-gradient: the FPN side is the teacher, so it is detached (the paper leaves
this open; it treats FPN maps as fixed teachers of the PAN outputs; see docs/methods.md). The adaptation
layers exist only for training; the detector is unchanged at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gaussian_mask import SigmaMode, gaussian_masks

__all__ = ["mssd_self_distill_loss", "mssd_mask_loss", "MSSDLoss", "MaskAdapter", "WeightingMean"]

_EPS = 1e-6

#: ``conv1x1``: one 1x1 conv (the smallest layer that maps a map to the mask's shape);
#: ``conv3x3``: 3x3 conv -> ReLU -> 1x1 conv, so a nonlinear layer, not the neck, can turn
#: the features into a heatmap.
MaskAdapter = Literal["conv1x1", "conv3x3"]

#: What the mask-weighted self term is averaged over: ``"mask"``, the mask's mass (a mean over
#: the objects), or ``"map"``, every cell (a plain MSE whose background cells count as zero).
#: With ``"mask"`` a map whose objects cover a fraction ``f`` of the cells gets ``1/f`` times the
#: per-cell gradient of a plain MSE; on aerial-cars crops that made the term's gradient ~50x the
#: detection loss's in the first steps (docs/benchmarks.md, "MSSD ablation"). ``"map"`` is the
#: default since 2026-12-07: on the tune split it beat ``"mask"`` by 12.3 car AP on the seed both ran.
WeightingMean = Literal["mask", "map"]


def mssd_self_distill_loss(fpn: Tensor, pan: Tensor, mask: Tensor | None = None, eps: float = _EPS,
                           weighting_mean: WeightingMean = "map") -> Tensor:
    """MSE from the PAN map (student) to the detached FPN map (teacher) at one scale.

    Args:
        fpn: ``(N, C, H, W)`` FPN map; detached here, receives no gradient.
        pan: ``(N, C, H, W)`` PAN map at the same scale; receives the gradient.
        mask: optional ``(N, 1, H, W)`` non-negative weights (the Gaussian mask).
        weighting_mean: with a mask, ``"map"`` (default) or ``"mask"`` (:data:`WeightingMean`).

    Returns:
        Scalar. Without a mask: ``mean((pan - fpn)^2)``. With a mask and ``"mask"``:
        ``sum(mask * (pan - fpn)^2) / (C * (sum(mask) + eps))``, the mask-weighted mean of the
        per-element squared error: on the scale of a plain MSE however few the objects, so its
        per-cell gradient grows as the objects shrink. With ``"map"``:
        ``mean(mask * (pan - fpn)^2)``, never above the plain MSE. The ``C`` factor makes either a
        per-element mean like ``F.mse_loss``. A scale with no objects (all-zero mask) contributes
        exactly 0, which is the intent: focus on targets.
    """
    if fpn.shape != pan.shape:
        raise ValueError(f"FPN {tuple(fpn.shape)} and PAN {tuple(pan.shape)} maps must have the same shape")
    teacher = fpn.detach()
    if mask is None:
        return F.mse_loss(pan, teacher)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != pan.shape[0] or mask.shape[-2:] != pan.shape[-2:]:
        raise ValueError(f"mask must be (N, 1, H, W) matching {tuple(pan.shape)}, got {tuple(mask.shape)}")
    if weighting_mean not in ("mask", "map"):
        raise ValueError(f"weighting_mean must be 'mask' or 'map', got {weighting_mean!r}")
    mask = mask.detach().to(pan.dtype)
    weighted = ((pan - teacher) ** 2 * mask).sum()
    if weighting_mean == "map":
        return weighted / pan.numel()
    return weighted / (pan.shape[1] * (mask.sum() + eps))


def mssd_mask_loss(adapted: Tensor, mask: Tensor) -> Tensor:
    """Plain MSE between the adapted output ``(N, 1, H, W)`` (in ``[0, 1]``) and the Gaussian mask ``(N, 1, H, W)``."""
    if adapted.shape != mask.shape:
        raise ValueError(f"adapted {tuple(adapted.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return F.mse_loss(adapted, mask.detach().to(adapted.dtype))


class MSSDLoss(nn.Module):
    """Multi-scale self-distillation plus Gaussian-mask auxiliary loss.

    Parameters are only the per-scale adaptation layers ``adapters[l]`` (``C -> 1``): a 1x1
    conv by default, or ``adapter="conv3x3"`` (3x3 conv ``C -> C``, ReLU, 1x1 conv ``C -> 1``).
    The paper only says "a feature adaptation layer"; with a linear 1x1 the mask loss can
    be met only by making the PAN map itself linearly separable into a heatmap, while the
    3x3 variant gives that job to a small nonlinear layer (an ablation for the cost of the
    mask term, docs/benchmarks.md). A sigmoid follows in ``forward`` because the mask lies
    in ``[0, 1]`` and a bounded output keeps the MSE well-conditioned (cf. CenterNet
    heatmaps). The last bias starts at ``log(0.01/0.99)`` so the initial prediction is near
    the all-background mask, which avoids a large first-step gradient into the neck.

    Args:
        channels: PAN channels (one int for all scales, or one per scale).
        num_scales: number of FPN/PAN pairs.
        scale_weights: ``w_l``, one per scale, for the self-distillation term.
        mask_weight: ``lambda`` for the mask term (summed over scales, not scale-weighted:
            the paper's per-scale coefficients are for the distillation losses).
        use_mask_weighting: weight the self-distillation term by the Gaussian mask.
        size_thresholds, sigma_mode, strides: forwarded to :func:`gaussian_masks`.
            ``sigma_mode`` defaults to ``"box_fraction"`` (σ = w/6, h/6: the Gaussian spans the
            whole box, the reading of "encode each box region"); ``"centernet"`` gives masks
            of one or two cells for small objects.
        adapter: the adaptation layer, ``"conv1x1"`` (default) or ``"conv3x3"`` (see above).
        weighting_mean: what the mask-weighted self term is averaged over, ``"map"`` (default)
            or ``"mask"`` (:data:`WeightingMean`); unused without ``use_mask_weighting``.
    """

    def __init__(
        self,
        channels: int | Sequence[int],
        num_scales: int = 3,
        scale_weights: Sequence[float] = (1.0, 1.0, 1.0),
        mask_weight: float = 1.0,
        use_mask_weighting: bool = True,
        size_thresholds: Sequence[float] = (32.0, 96.0),
        sigma_mode: SigmaMode = "box_fraction",
        strides: Sequence[int] = (8, 16, 32),
        adapter: MaskAdapter = "conv1x1",
        weighting_mean: WeightingMean = "map",
    ) -> None:
        super().__init__()
        chans = [channels] * num_scales if isinstance(channels, int) else list(channels)
        if not (len(chans) == len(scale_weights) == len(strides) == num_scales):
            raise ValueError("channels, scale_weights and strides need one entry per scale")
        if len(size_thresholds) != num_scales - 1:
            raise ValueError(f"need num_scales - 1 = {num_scales - 1} size thresholds")
        self.num_scales = num_scales
        self.scale_weights = tuple(float(w) for w in scale_weights)
        self.mask_weight = float(mask_weight)
        self.use_mask_weighting = use_mask_weighting
        self.size_thresholds = tuple(float(t) for t in size_thresholds)
        self.sigma_mode: SigmaMode = sigma_mode
        self.strides = tuple(int(s) for s in strides)
        if adapter not in ("conv1x1", "conv3x3"):
            raise ValueError(f"MSSD adapter must be 'conv1x1' or 'conv3x3', got {adapter!r}")
        self.adapter = adapter
        if weighting_mean not in ("mask", "map"):
            raise ValueError(f"MSSD weighting_mean must be 'mask' or 'map', got {weighting_mean!r}")
        self.weighting_mean: WeightingMean = weighting_mean
        self.adapters = nn.ModuleList(_mask_adapter(c, adapter) for c in chans)
        # Every layer is built before any is re-initialised: the RNG draws stay in the order
        # they had with one 1x1 conv per scale, so seeded runs reproduce earlier results.
        prior = torch.logit(torch.tensor(0.01)).item()
        for layer in self.adapters:
            last = layer if isinstance(layer, nn.Conv2d) else layer[-1]
            nn.init.normal_(last.weight, std=0.01)
            nn.init.constant_(last.bias, prior)

    def forward(
        self,
        fpn_maps: list[Tensor],
        pan_maps: list[Tensor],
        boxes_per_image: list[Tensor],
        image_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Args:
            fpn_maps: ``num_scales`` teacher maps ``(N, C_l, H_l, W_l)``, finest first.
            pan_maps: ``num_scales`` student maps, same shapes.
            boxes_per_image: ``N`` tensors ``(K_i, 4)`` xyxy pixels in the padded input frame.
            image_size: ``(H, W)`` of the padded network input.

        Returns:
            ``{'mssd_self': sum_l w_l L_self_l, 'mssd_mask': lambda * sum_l L_mask_l}``, scalars;
            without ``'mssd_mask'`` when ``mask_weight`` is 0: that term is off, not a zero loss
            (the adapters then run nowhere and get no gradient).
        """
        if len(fpn_maps) != self.num_scales or len(pan_maps) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} FPN and PAN maps, got {len(fpn_maps)} and {len(pan_maps)}")
        device = pan_maps[0].device
        with torch.no_grad():
            masks = gaussian_masks(
                [b.to(device) for b in boxes_per_image],
                image_size,
                strides=self.strides,
                size_thresholds=self.size_thresholds,
                sigma_mode=self.sigma_mode,
                feature_sizes=[tuple(p.shape[-2:]) for p in pan_maps],  # match the real maps
            )
        self_total = pan_maps[0].new_zeros(())
        mask_total = pan_maps[0].new_zeros(())
        for lvl, (fpn, pan, mask) in enumerate(zip(fpn_maps, pan_maps, masks)):
            mask = mask.to(device=device, dtype=pan.dtype)
            weight = mask if self.use_mask_weighting else None
            self_total = self_total + self.scale_weights[lvl] * mssd_self_distill_loss(
                fpn, pan, weight, weighting_mean=self.weighting_mean)
            if self.mask_weight:
                adapted = torch.sigmoid(self.adapters[lvl](pan))
                mask_total = mask_total + mssd_mask_loss(adapted, mask)
        if not self.mask_weight:
            return {"mssd_self": self_total}
        return {"mssd_self": self_total, "mssd_mask": self.mask_weight * mask_total}


def _mask_adapter(channels: int, kind: MaskAdapter) -> nn.Module:
    """One scale's adaptation layer ``(N, C, H, W) -> (N, 1, H, W)`` logits (see :class:`MSSDLoss`);
    its last 1x1 conv is initialised by the caller."""
    if kind == "conv1x1":
        return nn.Conv2d(channels, 1, kernel_size=1)  # a bare conv keeps the keys `adapters.<l>.weight|bias`
    hidden = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
    nn.init.kaiming_normal_(hidden.weight, nonlinearity="relu")
    nn.init.zeros_(hidden.bias)
    return nn.Sequential(hidden, nn.ReLU(inplace=True), nn.Conv2d(channels, 1, kernel_size=1))
