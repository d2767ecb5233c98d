"""Segmentation networks. Each returns logits ``(B, C, H, W, D)`` and, on request, decoder features."""

from __future__ import annotations

from crln.models.vnet import DOWNSAMPLING_FACTOR, VNet

__all__ = ["DOWNSAMPLING_FACTOR", "VNet"]
