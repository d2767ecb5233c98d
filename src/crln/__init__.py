"""crln: semi-supervised 3D medical image segmentation (CRLN and baselines in one engine)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
