"""The registry of dataset formats: one table read by detection, config checks and ``crln predict``.

Torch-free and numpy-free (like :mod:`crln.method_configs`): :mod:`crln.config` checks ``data.format``
against this table before anything heavy loads. The modules that read a format are imported only
when a folder or scan of that format is opened.

Adding a format:

1. Write one module (e.g. ``crln/data/myformat.py``) with three functions:

   - ``detect_root(root: Path) -> bool``: whether a dataset folder is in this format (cheap: look
     for a marker file or folder, read no case);
   - ``open_root(root: Path) -> CaseSource``: the dataset (``ids(split)``, ``load_many(ids)``,
     see :class:`crln.data.sources.CaseSource`);
   - ``read_scan(paths: list[Path], case_id: str) -> Case``: one unlabelled scan for ``crln predict``
     (``paths``: one file, or the channel files of one case); only needed with ``scan_endings``;
   - optionally ``check_scan(paths: list[Path], in_channels: int | None) -> None``: refuse a scan
     ``read_scan`` would refuse, or (``in_channels``) whose channel count differs from the network's, as
     far as cheap checks tell (headers, no voxels): ``crln predict`` runs it on every input before
     segmenting the first.

2. Add one :class:`DataFormat` line to :data:`FORMATS`, at its place in the detection order, with
   ``distance_unit="mm"`` when its cases carry their voxel size in mm.

``data.format=auto`` (what an evaluation on another folder uses) opens a folder with the first format
of :data:`FORMATS` whose ``detect_root`` accepts it, else with the last (the field's h5 layout, whose
reader then names what is missing). A config's ``data.format`` (``h5``, ``nifti``) selects the
formats whose ``selected_by`` it is, in the same way: ``h5`` opens the compact copy of an h5 dataset
when the folder holds one, and the h5 folder otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from crln.errors import CrlnError

if TYPE_CHECKING:
    import numpy as np

    from crln.data.case import Case
    from crln.data.sources import CaseSource

__all__ = [
    "DATA_FORMAT_VALUES",
    "FORMATS",
    "SCAN_ENDINGS",
    "DataFormat",
    "check_scans",
    "one_of",
    "read_scan",
    "scan_format",
    "select_format",
]


@dataclass(frozen=True)
class DataFormat:
    """One dataset format: its names, and the module that reads it (imported on first use).

    Attributes:
        name: the format's name (``compact``, ``nifti``, ``h5``).
        module: dotted name of the module with ``detect_root``, ``open_root`` (and ``read_scan``).
        selected_by: the ``data.format`` value that selects this format.
        scan_endings: file endings of single scans ``crln predict`` reads with ``read_scan``; empty when
            the format has no single-file scans.
        distance_unit: the unit of surface distances on its cases: ``"mm"`` when the format stores the
            voxel size (:attr:`crln.data.case.Case.spacing`), ``"voxels"`` when it has none (spacing 1).
        raw_scans: its scans hold a scanner's values, which its ``read_scan`` z-scores per channel unless
            asked for the stored ones (``normalize=False``); h5 scans hold what a prepare pipeline wrote.
    """

    name: str
    module: str
    selected_by: str
    scan_endings: tuple[str, ...] = ()
    distance_unit: str = "voxels"
    raw_scans: bool = False

    def _reader(self) -> ModuleType:
        return importlib.import_module(self.module)

    def detect(self, root: Path) -> bool:
        """Whether the folder ``root`` is in this format."""
        return bool(self._reader().detect_root(root))

    def open(self, root: Path) -> CaseSource:
        """The dataset in the folder ``root``."""
        return self._reader().open_root(root)

    def read_scan(self, paths: list[Path], case_id: str, *, normalize: bool = True) -> Case:
        """One unlabelled scan: a file, or the channel files of one case, as case ``case_id``; a format of
        :attr:`raw_scans` keeps the stored values with ``normalize=False``."""
        if self.raw_scans:
            return self._reader().read_scan(paths, case_id, normalize=normalize)
        return self._reader().read_scan(paths, case_id)

    def check_scan(self, paths: list[Path], in_channels: int | None = None) -> None:
        """The format's cheap checks of one scan, channel count against ``in_channels`` included (a no-op for
        a format without a ``check_scan``)."""
        check = getattr(self._reader(), "check_scan", None)
        if check is not None:
            check(paths, in_channels)


#: Every format, in detection order; the last is the fallback of ``data.format=auto``.
FORMATS: tuple[DataFormat, ...] = (
    # a compact copy of an h5 dataset (crln_compact.json, written by crln data compact)
    DataFormat("compact", "crln.data.compact", selected_by="h5"),
    # an nnU-Net v2 / MSD folder (imagesTr/, labelsTr/, dataset.json)
    DataFormat(
        "nifti",
        "crln.data.nifti",
        selected_by="nifti",
        scan_endings=(".nii.gz", ".nii"),
        distance_unit="mm",
        raw_scans=True,
    ),
    # the field's h5 layout (case lists train.list / test.list, one .h5 file per case)
    DataFormat("h5", "crln.data.h5", selected_by="h5", scan_endings=(".h5", ".hdf5")),
)

#: The values ``data.format`` accepts.
DATA_FORMAT_VALUES: tuple[str, ...] = tuple(dict.fromkeys(f.selected_by for f in FORMATS))
#: File endings ``crln predict`` reads as scans.
SCAN_ENDINGS: tuple[str, ...] = tuple(ending for f in FORMATS for ending in f.scan_endings)


def one_of(values: tuple[str, ...], *, quote: bool = True) -> str:
    """``'a', 'b' or 'c'`` (``a, b or c`` without ``quote``): the values a message expects."""
    shown = [repr(v) if quote else v for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def select_format(root: Path, fmt: str = "auto") -> DataFormat:
    """The format to open the folder ``root`` with, for a ``data.format`` value or ``"auto"``.

    Raises:
        CrlnError: ``fmt`` is neither ``"auto"`` nor a value of :data:`DATA_FORMAT_VALUES`.
    """
    candidates = [f for f in FORMATS if fmt in ("auto", f.selected_by)]
    if not candidates:
        raise CrlnError(f"dataset format {fmt!r}: expected {one_of(DATA_FORMAT_VALUES)}")
    return next((f for f in candidates if f.detect(root)), candidates[-1])


def scan_format(path: Path) -> DataFormat | None:
    """The format whose scans end like ``path``, or ``None``."""
    return next((f for f in FORMATS if path.name.endswith(f.scan_endings)), None)


def _scan_format_of(path: Path) -> DataFormat:
    fmt = scan_format(path)
    if fmt is None:
        raise CrlnError(f"input {path}: expected a {one_of(SCAN_ENDINGS, quote=False)} file")
    return fmt


def read_scan(paths: list[Path], case_id: str, prepare: Callable[[np.ndarray, str], np.ndarray] | None = None) -> Case:
    """One unlabelled scan for ``crln predict``: a file, or the channel files of one case.

    Args:
        prepare: how to normalise a raw scan's stored values ``(C, H, W, D)`` (with the file's name for
            errors) instead of its format's per-channel z-score
            (:func:`crln.data.prepare_raw.scan_normalizer`); scans of a format without
            :attr:`DataFormat.raw_scans` are read as stored whatever it says.

    Raises:
        CrlnError: a file of no format's :data:`SCAN_ENDINGS`, or what the format's reader or ``prepare`` raises.
    """
    fmt = _scan_format_of(paths[0])
    if prepare is None or not fmt.raw_scans:
        return fmt.read_scan(paths, case_id)
    case = fmt.read_scan(paths, case_id, normalize=False)
    channels = case.image if case.image.ndim == 4 else case.image[None]
    prepared = prepare(channels, str(paths[0]))
    case.image = prepared if case.image.ndim == 4 else prepared[0]
    return case


def check_scans(scans: list[list[Path]], in_channels: int | None = None) -> None:
    """Check every scan (the files of each) as far as its format's cheap ``check_scan`` tells, before any is
    read; with ``in_channels`` (the network's) the channel counts too.

    Raises:
        CrlnError: a file of no format's :data:`SCAN_ENDINGS`, or what the format's ``check_scan`` raises.
    """
    for paths in scans:
        _scan_format_of(paths[0]).check_scan(paths, in_channels)
