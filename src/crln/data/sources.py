"""Open the dataset a config names, in the format the registry :mod:`crln.data_formats` picks."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from crln.data.case import Case
from crln.data_formats import select_format
from crln.errors import CrlnError

__all__ = ["CaseSource", "open_dataset", "open_dataset_root"]


class CaseSource(Protocol):
    """What the engine needs from a dataset."""

    def ids(self, split: str) -> list[str]: ...

    def load_many(self, ids: list[str], with_label: bool = True) -> list[Case]: ...


def open_dataset_root(root: str | Path, fmt: str = "auto") -> CaseSource:
    """Open ``root`` in the format :func:`crln.data_formats.select_format` picks for ``fmt``.

    With ``fmt`` ``"auto"`` that is the first format of :data:`crln.data_formats.FORMATS` that detects
    the folder: a compact copy (``crln_compact.json``), an nnU-Net/MSD folder (``imagesTr/``), else the
    field's h5 layout. ``"h5"`` opens a compact copy too, so the same config trains on either copy.

    Args:
        root: dataset folder.
        fmt: ``"auto"`` or a ``data.format`` value (``"h5"``, ``"nifti"``).
    """
    path = Path(root)
    if not str(root):
        raise CrlnError("config key data.root: no dataset folder given (set data.root=DIR)")
    if not path.is_dir():
        raise CrlnError(f"data root {path}: no such folder (set data.root or --data to a dataset folder)")
    return select_format(path, fmt).open(path)


def open_dataset(data_config: object) -> CaseSource:
    """Open the dataset of a :class:`crln.config.DataConfig`."""
    return open_dataset_root(data_config.root, data_config.format)  # type: ignore[attr-defined]
