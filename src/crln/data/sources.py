"""Open the dataset a config names (field h5 layout or nnU-Net/MSD NIfTI folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from crln.data.case import Case
from crln.errors import CrlnError

__all__ = ["CaseSource", "open_dataset", "open_dataset_root"]


class CaseSource(Protocol):
    """What the engine needs from a dataset."""

    def ids(self, split: str) -> list[str]: ...

    def load_many(self, ids: list[str], with_label: bool = True) -> list[Case]: ...


def open_dataset_root(root: str | Path, fmt: str = "auto") -> CaseSource:
    """Open ``root`` as an h5 (``*.list`` / ``*.txt`` case lists) or NIfTI (``imagesTr/``) dataset.

    A folder holding ``crln_compact.json`` (written by ``crln data compact``) is the compact copy of an
    h5 dataset: with ``fmt`` ``"auto"`` or ``"h5"`` it is read by :class:`crln.data.compact.CompactDataset`,
    so the same config trains on either copy.

    Args:
        root: dataset folder.
        fmt: one of {``"auto"``, ``"h5"``, ``"nifti"``}; auto picks NIfTI when ``imagesTr/`` exists.
    """
    from crln.data.compact import CompactDataset, is_compact_root
    from crln.data.h5 import H5Dataset
    from crln.data.nifti import NiftiDataset

    path = Path(root)
    if not str(root):
        raise CrlnError("config key data.root: no dataset folder given (set data.root=DIR)")
    if not path.is_dir():
        raise CrlnError(f"data root {path}: no such folder (set data.root or --data to a dataset folder)")
    if fmt in ("auto", "h5") and is_compact_root(path):
        return CompactDataset(path)
    if fmt == "auto":
        fmt = "nifti" if (path / "imagesTr").is_dir() else "h5"
    if fmt == "nifti":
        return NiftiDataset(path)
    if fmt == "h5":
        return H5Dataset(path)
    raise CrlnError(f"dataset format {fmt!r}: expected 'h5' or 'nifti'")


def open_dataset(data_config: object) -> CaseSource:
    """Open the dataset of a :class:`crln.config.DataConfig`."""
    return open_dataset_root(data_config.root, data_config.format)  # type: ignore[attr-defined]
