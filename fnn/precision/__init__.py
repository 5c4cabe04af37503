"""Mixed precision: one policy for every layer, for autodiff and for the hand path
(:mod:`fnn.precision.policies`), and loss scaling for float16 (:mod:`fnn.precision.scaling`).
"""
from fnn.precision.scaling import (LossScale, LossScalingState, ScaledLoss, all_finite,
                                   current_scale, loss_scale, loss_scaling, scale_loss, unscale,
                                   update_scale)
from fnn.precision.policies import Policy, full_precision, mixed_precision, policy

__all__ = ["Policy", "policy", "mixed_precision", "full_precision", "LossScale",
           "loss_scale", "scale_loss", "unscale", "update_scale", "all_finite",
           "LossScalingState", "loss_scaling", "current_scale", "ScaledLoss"]
