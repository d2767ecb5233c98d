"""The semi-supervised field's standard 3D VNet.

The architecture that UA-MT, MC-Net, BCP and CRLN all use on LA and Pancreas-CT: five encoder
stages of 1-2-3-3-3 convolutions (3×3×3, normalisation, ReLU), strided
2×2×2 down-convolutions, transposed-convolution up-sampling with additive skip connections, and a
1×1×1 output convolution. With ``n_filters=16`` the decoder features at 1/4, 1/2 and full resolution
have 64, 32 and 16 channels; CRLN's DIM and CPS read them (``return_features=True``).

Reference: Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical
Image Segmentation", 3DV 2016; layout as in Yu et al., "Uncertainty-aware Self-ensembling Model
for Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019.
"""

from __future__ import annotations

from torch import Tensor, nn

from crln.models.layers import DOWNSAMPLING_FACTOR, check_common_arguments
from crln.models.layers import norm_layer as _norm

__all__ = ["DOWNSAMPLING_FACTOR", "VNet"]


class _ConvStage(nn.Module):
    """``n`` conv-norm-ReLU layers at constant resolution."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_convs):
            layers += [
                nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                _norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _Resample(nn.Module):
    """Stride-2 down-convolution or transposed up-convolution, then norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, *, up: bool) -> None:
        super().__init__()
        conv_cls = nn.ConvTranspose3d if up else nn.Conv3d
        self.layers = nn.Sequential(
            conv_cls(in_channels, out_channels, 2, stride=2),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class VNet(nn.Module):
    """3D VNet returning logits and, on request, its decoder features.

    Args:
        in_channels: image channels (1 for LA, Pancreas-CT and FLAIR-only BraTS).
        num_classes: output classes C, background included.
        n_filters: channels of the first stage; stage k has ``n_filters * 2**k``.
        normalization: one of {``"batchnorm"``, ``"groupnorm"``, ``"instancenorm"``, ``"none"``};
            the field uses ``"batchnorm"``.
        dropout: dropout probability applied to the deepest encoder and last decoder features
            (the field's ``has_dropout`` uses 0.5); 0 disables it.

    Raises:
        ValueError: on a non-positive size or an unknown normalisation.

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
        normalization: str = "batchnorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_common_arguments(in_channels, num_classes, n_filters, normalization, dropout)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_filters = n_filters
        f, norm = n_filters, normalization

        self.enc1 = _ConvStage(1, in_channels, f, norm)
        self.down1 = _Resample(f, 2 * f, norm, up=False)
        self.enc2 = _ConvStage(2, 2 * f, 2 * f, norm)
        self.down2 = _Resample(2 * f, 4 * f, norm, up=False)
        self.enc3 = _ConvStage(3, 4 * f, 4 * f, norm)
        self.down3 = _Resample(4 * f, 8 * f, norm, up=False)
        self.enc4 = _ConvStage(3, 8 * f, 8 * f, norm)
        self.down4 = _Resample(8 * f, 16 * f, norm, up=False)
        self.enc5 = _ConvStage(3, 16 * f, 16 * f, norm)

        self.up5 = _Resample(16 * f, 8 * f, norm, up=True)
        self.dec4 = _ConvStage(3, 8 * f, 8 * f, norm)
        self.up4 = _Resample(8 * f, 4 * f, norm, up=True)
        self.dec3 = _ConvStage(3, 4 * f, 4 * f, norm)
        self.up3 = _Resample(4 * f, 2 * f, norm, up=True)
        self.dec2 = _ConvStage(2, 2 * f, 2 * f, norm)
        self.up2 = _Resample(2 * f, f, norm, up=True)
        self.dec1 = _ConvStage(1, f, f, norm)
        self.dropout = nn.Dropout3d(p=dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(f, num_classes, 1)

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of the decoder features returned with ``return_features=True``."""
        return {"quarter": 4 * self.n_filters, "half": 2 * self.n_filters, "full": self.n_filters}

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Segment ``x`` ``(B, in_channels, H, W, D)``; see the class docstring for outputs."""
        if x.ndim != 5 or any(s % DOWNSAMPLING_FACTOR for s in x.shape[2:]):
            raise ValueError(
                f"VNet input must be (B, C, H, W, D) with H, W, D multiples of {DOWNSAMPLING_FACTOR}, "
                f"got {tuple(x.shape)}"
            )
        # Plain conv stages, additive skips: the field's VNet (its ConvBlock, not the residual one).
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.dropout(self.enc5(self.down4(x4)))

        y4 = self.dec4(self.up5(x5) + x4)
        quarter = self.dec3(self.up4(y4) + x3)
        half = self.dec2(self.up3(quarter) + x2)
        full = self.dec1(self.up2(half) + x1)
        logits = self.head(self.dropout(full))
        if return_features:
            return logits, {"quarter": quarter, "half": half, "full": full}
        return logits
