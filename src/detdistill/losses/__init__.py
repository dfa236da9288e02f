"""Distillation losses: pure tensor functions and thin modules.

They are registered as methods (with their kind and default weight) in
:data:`detdistill.distill.methods.METHODS` under the names ``'l2'`` (:class:`L2FeatureLoss`), ``'l1'`` (:class:`L1FeatureLoss`),
``'pkd'`` (:class:`PKDLoss`), ``'ssim'`` (:class:`SSIMLoss`), ``'kl'`` (:class:`KLLogitLoss`).
"""

from detdistill.losses.feature import L1FeatureLoss, L2FeatureLoss, l1_feature_loss, l2_feature_loss
from detdistill.losses.pkd import PKDLoss, channel_standardize, pkd_loss
from detdistill.losses.ssim import (
    SSIMLoss,
    gaussian_window_1d,
    minmax_normalize,
    ssim_components,
    ssim_loss,
    ssim_map,
)
from detdistill.losses.kl import KLLogitLoss, kl_logit_loss

__all__ = [
    "l2_feature_loss",
    "l1_feature_loss",
    "L2FeatureLoss",
    "L1FeatureLoss",
    "pkd_loss",
    "channel_standardize",
    "PKDLoss",
    "ssim_map",
    "ssim_components",
    "ssim_loss",
    "minmax_normalize",
    "gaussian_window_1d",
    "SSIMLoss",
    "kl_logit_loss",
    "KLLogitLoss",
]
