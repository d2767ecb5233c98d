"""The 3D-UNet the semi-supervised field uses on BraTS19 (Çiçek et al. 2016, as in SSL4MIS and TraCoCo).

Five resolution levels of two 3×3×3 convolutions (convolution, normalisation, ReLU), 2×2×2 max-pool
down-sampling, trilinear ×2 up-sampling followed by concatenation with the encoder skip and two
convolutions, and a 1×1×1 output convolution. With ``n_filters=16`` (the field's ``feature_scale=4``
of 64-128-256-512-1024) the levels have 16, 32, 64, 128 and 256 channels, the normalisation is a
non-affine instance norm, and dropout (0.3 in the field) follows the bottleneck and the last decoder
level. The decoder features at 1/4, 1/2 and full resolution have 64, 32 and 16 channels, the same
names and widths as :class:`crln.models.VNet`'s, so CRLN's DIM and CPS read either network.

Reference: Çiçek et al., "3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation",
MICCAI 2016.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crln.models.layers import DOWNSAMPLING_FACTOR, check_common_arguments, norm_layer

__all__ = ["UNet3D"]

_LEVELS = 5  # four down-samplings: DOWNSAMPLING_FACTOR = 2 ** (_LEVELS - 1)
_UPSAMPLE_FACTOR = 2


class _DoubleConv(nn.Module):
    """Two 3×3×3 convolution → normalisation → ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _Up(nn.Module):
    """Trilinear ×2 up-sampling of the coarse input, concatenation with the skip, then :class:`_DoubleConv`."""

    def __init__(self, coarse_channels: int, skip_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = _DoubleConv(coarse_channels + skip_channels, skip_channels, norm)

    def forward(self, skip: Tensor, coarse: Tensor) -> Tensor:
        up = F.interpolate(coarse, scale_factor=_UPSAMPLE_FACTOR, mode="trilinear", align_corners=False)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet3D(nn.Module):
    """3D-UNet returning logits and, on request, its decoder features.

    Args:
        in_channels: image channels (1 for FLAIR-only BraTS19).
        num_classes: output classes C, background included.
        n_filters: channels of the first level; level k has ``n_filters * 2**k`` (the field: 16).
        normalization: one of {``"batchnorm"``, ``"groupnorm"``, ``"instancenorm"``, ``"none"``};
            the field's 3D-UNet uses ``"instancenorm"``.
        dropout: element-wise dropout probability after the bottleneck and after the last decoder
            level (the field: 0.3); 0 disables it.

    Raises:
        ValueError: on a non-positive size, an unknown normalisation or a dropout outside [0, 1).

    Input ``(B, in_channels, H, W, D)`` with H, W, D multiples of :data:`DOWNSAMPLING_FACTOR`;
    output logits ``(B, C, H, W, D)``. With ``return_features=True`` the forward also returns a dict
    of decoder features: ``"quarter"`` ``(B, 4·n_filters, H/4, W/4, D/4)``, ``"half"``
    ``(B, 2·n_filters, H/2, W/2, D/2)`` and ``"full"`` ``(B, n_filters, H, W, D)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        n_filters: int = 16,
        normalization: str = "instancenorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_common_arguments(in_channels, num_classes, n_filters, normalization, dropout)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_filters = n_filters
        widths = [n_filters * 2**k for k in range(_LEVELS)]
        self.encoders = nn.ModuleList(
            [_DoubleConv(in_channels if k == 0 else widths[k - 1], widths[k], normalization) for k in range(_LEVELS)]
        )
        # decoders[k] brings level k + 1 up to level k (applied deepest first)
        self.decoders = nn.ModuleList([_Up(widths[k + 1], widths[k], normalization) for k in range(_LEVELS - 1)])
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(n_filters, num_classes, 1)

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of the decoder features returned with ``return_features=True``."""
        return {"quarter": 4 * self.n_filters, "half": 2 * self.n_filters, "full": self.n_filters}

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Segment ``x`` ``(B, in_channels, H, W, D)``; see the class docstring for outputs."""
        if x.ndim != 5 or any(s % DOWNSAMPLING_FACTOR for s in x.shape[2:]):
            raise ValueError(
                f"UNet3D input must be (B, C, H, W, D) with H, W, D multiples of {DOWNSAMPLING_FACTOR}, "
                f"got {tuple(x.shape)}"
            )
        skips: list[Tensor] = []
        h = x
        for k, encoder in enumerate(self.encoders):
            h = encoder(h if k == 0 else F.max_pool3d(h, 2))
            skips.append(h)
        y = self.dropout(skips[-1])
        decoded: dict[int, Tensor] = {}
        for k in reversed(range(_LEVELS - 1)):
            y = self.decoders[k](skips[k], y)
            decoded[k] = y
        full = self.dropout(decoded[0])
        logits = self.head(full)
        if return_features:
            # level k is at 1 / 2**k resolution: level 2 = quarter, level 1 = half
            return logits, {"quarter": decoded[2], "half": decoded[1], "full": decoded[0]}
        return logits
