"""The unit every reader returns: one volume with its label and geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Case"]


@dataclass
class Case:
    """One 3D case.

    Attributes:
        case_id: identifier as written in the case list (e.g. the LA folder name).
        image: ``(H, W, D)`` float32 volume (D = slice axis), or ``(C, H, W, D)`` for multi-channel data.
        label: ``(H, W, D)`` uint8 class indices, or ``None`` for unlabelled / inference-only cases.
        spacing: voxel size in mm along (H, W, D); ``(1, 1, 1)`` when the format has none (h5).
        affine: ``(4, 4)`` voxel-to-world matrix (NIfTI convention); identity scaled by spacing for h5.
        source: path the case was read from, for error messages and provenance.
        label_source: path the label was read from when it is another file (NIfTI), else ``""``.
        channel_sources: the file of each channel when channels come from separate files (nnU-Net
            ``<id>_0000``, ``<id>_0001``, ...), else ``()``.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    source: str = ""
    label_source: str = ""
    channel_sources: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(H, W, D)``."""
        return tuple(self.image.shape[-3:])  # type: ignore[return-value]
