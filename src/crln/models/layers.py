"""Building blocks shared by the segmentation networks (VNet, 3D-UNet)."""

from __future__ import annotations

from torch import nn

# Defined beside the config, which checks them before torch loads.
from crln.config import DOWNSAMPLING_FACTOR, NORMALIZATIONS

__all__ = ["DOWNSAMPLING_FACTOR", "NORMALIZATIONS", "check_common_arguments", "norm_layer"]

_GROUPNORM_GROUPS = 16


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation ``kind`` (one of :data:`NORMALIZATIONS`) over ``channels`` channels.

    ``"instancenorm"`` has no affine parameters (``nn.InstanceNorm3d`` defaults), as in the field's
    3D-UNet; ``"groupnorm"`` uses 16 groups when ``channels`` allows it, else one.
    """
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "groupnorm":
        groups = _GROUPNORM_GROUPS if channels % _GROUPNORM_GROUPS == 0 else 1
        return nn.GroupNorm(num_groups=groups, num_channels=channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    return nn.Identity()


def check_common_arguments(
    in_channels: int, num_classes: int, n_filters: int, normalization: str, dropout: float
) -> None:
    """Raise ``ValueError`` on a non-positive size, an unknown normalisation or a dropout outside [0, 1)."""
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("n_filters", n_filters)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
