"""An nnU-Net / MSD folder's ``dataset.json``: classes, channels and file ending, read without torch.

Config checks take ``data.num_classes`` and ``model.in_channels`` from it before any heavy import
(:func:`crln.config.resolve_from_dataset_json`), and :class:`crln.data.nifti.NiftiDataset` reads the
folder with it; both read it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crln.errors import CrlnError

__all__ = ["DatasetJson"]


@dataclass(frozen=True)
class DatasetJson:
    """The parsed ``dataset.json`` of ``root`` (empty when the folder has none)."""

    root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str | Path) -> DatasetJson:
        """Raises: CrlnError: a ``dataset.json`` that is not readable JSON or not a JSON object."""
        path = Path(root) / "dataset.json"
        if not path.is_file():
            return cls(Path(root))
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CrlnError(f"{path}: unreadable dataset.json: {str(exc).splitlines()[0]}") from None
        if not isinstance(meta, dict):
            raise CrlnError(f"{path}: top level is {type(meta).__name__}, expected a JSON object")
        return cls(Path(root), meta)

    @property
    def file_ending(self) -> str:
        return str(self.meta.get("file_ending", ".nii.gz"))

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> index (nnU-Net v2 ``{"background": 0}`` or MSD ``{"0": "background"}``)."""
        out: dict[str, int] = {}
        for k, v in self.meta.get("labels", {}).items():
            if isinstance(v, int):
                out[str(k)] = v
            elif str(k).isdigit():
                out[str(v)] = int(k)
            elif isinstance(v, list) and v:  # nnU-Net region labels: take the first index
                out[str(k)] = int(v[0])
            else:
                raise CrlnError(f"{self.root / 'dataset.json'}: key 'labels' entry {k!r}: {v!r} is not a class index")
        return out

    @property
    def num_classes(self) -> int | None:
        """Number of classes (``None`` when unknown)."""
        labels = self.labels
        return max(labels.values()) + 1 if labels else None

    @property
    def channel_names(self) -> dict[str, str]:
        """Channel index -> name (``channel_names`` or MSD ``modality``)."""
        return dict(self.meta.get("channel_names", self.meta.get("modality", {})))

    @property
    def num_channels(self) -> int | None:
        """Number of input channels (``None`` when unknown)."""
        return len(self.channel_names) or None
