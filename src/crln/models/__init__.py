"""Segmentation networks. Each returns logits ``(B, C, H, W, D)`` and, on request, decoder features.

Networks are chosen by name (config key ``model.name``) through :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from crln.errors import CrlnError
from crln.models.layers import DOWNSAMPLING_FACTOR, NORMALIZATIONS
from crln.models.unet3d import UNet3D
from crln.models.vnet import VNet

if TYPE_CHECKING:
    from crln.config import RunConfig

__all__ = ["DOWNSAMPLING_FACTOR", "MODELS", "NORMALIZATIONS", "UNet3D", "VNet", "build_model", "network_factory"]

#: ``model.name`` → network class; every class takes
#: ``(in_channels, num_classes, n_filters, normalization, dropout)``.
MODELS: dict[str, type[nn.Module]] = {"vnet": VNet, "unet3d": UNet3D}


def build_model(
    name: str, *, in_channels: int, num_classes: int, n_filters: int, normalization: str, dropout: float
) -> nn.Module:
    """Build the network registered as ``name`` (see :data:`MODELS`).

    Raises:
        CrlnError: unknown ``name``.
    """
    if name not in MODELS:
        raise CrlnError(f"config key model.name: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](in_channels, num_classes, n_filters, normalization, dropout)


def network_factory(config: RunConfig) -> Callable[[], nn.Module]:
    """A zero-argument callable building the configured segmentation network (``model.name``)."""
    m, num_classes = config.model, config.data.num_classes

    def factory() -> nn.Module:
        return build_model(
            m.name,
            in_channels=m.in_channels,
            num_classes=num_classes,
            n_filters=m.n_filters,
            normalization=m.normalization,
            dropout=m.dropout,
        )

    return factory
