"""Readers for the public raw formats of the benchmark datasets: NRRD (LA 2018), DICOM series
(Pancreas-CT) and NIfTI (Pancreas-CT labels, BraTS19).

Every reader returns a :class:`RawVolume`: the voxel array in ``(x, y, z)`` order (NIfTI / ITK
convention: x = image column, y = image row, z = slice), its spacing in mm and its voxel-to-world
affine in RAS+ millimetres. Every failure of a third-party reader becomes one :class:`CrlnError`
line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations

# the one reader of NIfTI files (gzip checksum verified), and the voxel size of an affine
from crln.data.nifti import affine_spacing, load_nifti
from crln.errors import CrlnError

__all__ = ["RawVolume", "align_to_grid", "read_dicom_series", "read_nifti", "read_nrrd"]

#: LPS (DICOM, NRRD "left-posterior-superior") to RAS (NIfTI): negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Relative tolerance on slice spacing (gaps or uneven slices beyond it are refused).
_SLICE_GAP_TOLERANCE = 0.05
#: Largest disagreement, in voxels, between a label's and its image's world grids.
_GRID_TOLERANCE_VOXELS = 0.5


@dataclass
class RawVolume:
    """One volume read from a raw file.

    Attributes:
        data: voxel array ``(x, y, z)`` (dtype as stored, or float32 Hounsfield units for DICOM).
        spacing: voxel size in mm along x, y, z.
        affine: ``(4, 4)`` voxel index → RAS+ mm.
        source: the file or folder it came from.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CrlnError(f"{path}: file not found, expected {what}")
    if path.stat().st_size == 0:
        raise CrlnError(f"{path}: file is empty (0 bytes), expected {what}")


# --------------------------------------------------------------------------------------------------
# NRRD


def read_nrrd(path: str | Path) -> RawVolume:
    """Read a 3D NRRD file (pynrrd), e.g. the LA 2018 challenge's ``lgemri.nrrd`` / ``laendo.nrrd``.

    The spacing comes from ``space directions`` (column norms) or, failing that, ``spacings``
    (1 mm when neither is present). The affine is RAS+ when ``space`` is a left-posterior-superior
    space, as it is in the challenge's files.

    Raises:
        CrlnError: missing, empty, corrupt or unreadable file, or not 3D.
    """
    import nrrd

    path = Path(path)
    _require_file(path, "an NRRD volume")
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, OSError, zlib.error ...
        raise CrlnError(f"{path}: unreadable NRRD file: {_first_line(exc)}") from None
    if data.ndim != 3:
        raise CrlnError(f"{path}: NRRD data has shape {data.shape} ({data.ndim}D), expected a 3D volume")
    directions = header.get("space directions")
    linear = np.eye(3)
    if directions is not None:
        try:
            matrix = np.asarray(directions, dtype=np.float64)
        except (TypeError, ValueError):
            matrix = None
        if matrix is not None and matrix.shape == (3, 3) and np.all(np.isfinite(matrix)):
            linear = matrix.T  # rows of "space directions" are the axes' steps: columns of the affine
    elif header.get("spacings") is not None:
        linear = np.diag(np.asarray(header["spacings"], dtype=np.float64)[:3])
    affine = np.eye(4)
    affine[:3, :3] = linear
    origin = header.get("space origin")
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    if str(header.get("space", "")).lower() in ("left-posterior-superior", "lps"):
        affine = _LPS_TO_RAS @ affine
    return RawVolume(data=data, spacing=affine_spacing(affine), affine=affine, source=str(path))


# --------------------------------------------------------------------------------------------------
# NIfTI


def read_nifti(path: str | Path) -> RawVolume:
    """Read a 3D NIfTI file (nibabel) as stored: array ``(x, y, z)``, the file's affine and its voxel size.

    Raises:
        CrlnError: missing, empty, corrupt or unreadable file, or not 3D.
    """
    path = Path(path)
    data, affine, spacing = load_nifti(path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CrlnError(f"{path}: NIfTI data has shape {data.shape} ({data.ndim}D), expected a 3D volume")
    return RawVolume(data=data, spacing=spacing, affine=affine, source=str(path))


# --------------------------------------------------------------------------------------------------
# DICOM series


def read_dicom_series(folder: str | Path) -> RawVolume:
    """Read one CT series (every DICOM file with pixel data under ``folder``) in Hounsfield units.

    Slices are ordered along the slice normal (the cross product of the two in-plane directions of
    ``ImageOrientationPatient``) by ``ImagePositionPatient``, never by file name or instance number.
    Each slice becomes ``pixel_array * RescaleSlope + RescaleIntercept`` (float32). The slice spacing
    is the distance between consecutive positions (``SliceThickness`` can differ from it); the
    in-plane spacing is ``PixelSpacing`` (row spacing, column spacing).

    Returns:
        A :class:`RawVolume` with data ``(columns, rows, slices)`` float32 HU and a RAS+ affine.

    Raises:
        CrlnError: no DICOM slices, several series, missing geometry tags, slices of different size
            or orientation, duplicate positions, or uneven slice spacing (a missing slice).
    """
    folder = Path(folder)
    slices = _dicom_slices(folder)
    first_path, first = slices[0]
    orientation = np.asarray(_dicom_tag(first_path, first, "ImageOrientationPatient"), dtype=np.float64)
    if orientation.shape != (6,):
        raise CrlnError(f"{first_path}: ImageOrientationPatient has {orientation.size} values, expected 6")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = np.asarray(_dicom_tag(first_path, first, "PixelSpacing"), dtype=np.float64)
    shape_2d = (int(_dicom_tag(first_path, first, "Rows")), int(_dicom_tag(first_path, first, "Columns")))
    positions = []
    for path, ds in slices:
        if not np.allclose(np.asarray(_dicom_tag(path, ds, "ImageOrientationPatient"), dtype=np.float64), orientation):
            raise CrlnError(f"{path}: ImageOrientationPatient differs from {first_path.name}, expected one orientation")
        if (int(ds.Rows), int(ds.Columns)) != shape_2d:
            raise CrlnError(f"{path}: slice is {ds.Rows}x{ds.Columns}, expected {shape_2d[0]}x{shape_2d[1]}")
        positions.append(np.asarray(_dicom_tag(path, ds, "ImagePositionPatient"), dtype=np.float64))
    order, slice_spacing = _slice_order(folder, positions, normal, first)
    volume = np.empty((shape_2d[1], shape_2d[0], len(slices)), dtype=np.float32)
    for k, index in enumerate(order):
        volume[:, :, k] = _slice_hu(*slices[index]).T  # (rows, cols) -> (x = col, y = row)
    # DICOM patient space is LPS; index i runs along a row (column index), j down the rows.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]
    affine_lps[:3, 2] = normal * slice_spacing
    affine_lps[:3, 3] = positions[order[0]]
    affine = _LPS_TO_RAS @ affine_lps
    return RawVolume(data=volume, spacing=affine_spacing(affine), affine=affine, source=str(folder))


def _dicom_slices(folder: Path) -> list[tuple[Path, Any]]:
    """``(path, dataset)`` of every DICOM file with pixel data under ``folder`` (one series), by path."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise CrlnError(f"{folder}: DICOM series folder not found")
    slices = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(str(path))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not a DICOM file (a README, a DICOMDIR without images, ...)
        if "PixelData" in ds:
            slices.append((path, ds))
    if not slices:
        raise CrlnError(f"{folder}: no DICOM slices with pixel data found, expected one CT series")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise CrlnError(f"{folder}: holds {len(series)} DICOM series, expected exactly one per case folder")
    return slices


def _dicom_tag(path: Path, ds: Any, name: str) -> Any:
    value = getattr(ds, name, None)
    if value is None:
        raise CrlnError(f"{path}: DICOM tag {name} missing, expected it to place the slice in space")
    return value


def _slice_order(folder: Path, positions: list[np.ndarray], normal: np.ndarray, first: Any) -> tuple[np.ndarray, float]:
    """Slice indices sorted along ``normal`` and the slice spacing (``SliceThickness`` for one slice);
    refuses duplicate positions and uneven spacing (a missing slice)."""
    along = np.array([float(p @ normal) for p in positions])
    order = np.argsort(along, kind="stable")
    if len(positions) == 1:
        return order, float(getattr(first, "SliceThickness", 1.0) or 1.0)
    steps = np.diff(along[order])
    if np.any(steps <= 0):
        raise CrlnError(f"{folder}: two slices share a position along the slice normal, expected distinct slices")
    slice_spacing = float(np.median(steps))
    if np.any(np.abs(steps - slice_spacing) > _SLICE_GAP_TOLERANCE * slice_spacing):
        raise CrlnError(
            f"{folder}: slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm, "
            "expected evenly spaced slices (is a slice missing?)"
        )
    return order, slice_spacing


def _slice_hu(path: Path, ds: Any) -> np.ndarray:
    """One slice in Hounsfield units: ``pixel_array · RescaleSlope + RescaleIntercept``, ``(rows, cols)`` float32."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing codecs or corrupt data
        raise CrlnError(f"{path}: cannot decode the DICOM pixel data: {_first_line(exc)}") from None
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return pixels.astype(np.float32) * slope + intercept


# --------------------------------------------------------------------------------------------------
# grids


def align_to_grid(moving: RawVolume, reference: RawVolume, *, use_affine: bool = True) -> np.ndarray:
    """``moving.data`` reoriented (axis permutations and flips only) onto ``reference``'s voxel grid.

    With ``use_affine`` the two affines decide the permutation and flips, and the result must then
    lie on the reference grid (same shape, world positions within half a voxel). Without it the
    arrays are taken as already in the same voxel order and only the shapes are checked.

    Returns:
        ``moving.data`` as an array of ``reference.data.shape``.

    Raises:
        CrlnError: the volumes do not share a grid (shape or position), naming both files.
    """
    data = moving.data
    if use_affine:
        src_ornt = orientations.io_orientation(moving.affine)
        dst_ornt = orientations.io_orientation(reference.affine)
        transform = orientations.ornt_transform(src_ornt, dst_ornt)
        data = orientations.apply_orientation(data, transform)
        affine = moving.affine @ orientations.inv_ornt_aff(transform, moving.data.shape)
    if data.shape != reference.data.shape:
        raise CrlnError(
            f"{moving.source}: shape {data.shape} on the image's axes, expected the image's {reference.data.shape} "
            f"({reference.source})"
        )
    if use_affine:
        corners = np.array([[0, 0, 0, 1], [*[s - 1 for s in data.shape], 1]], dtype=np.float64).T
        offset = np.abs(affine @ corners - reference.affine @ corners)[:3].max()
        limit = _GRID_TOLERANCE_VOXELS * min(reference.spacing)
        if offset > limit:
            raise CrlnError(
                f"{moving.source}: its grid is {offset:.2f} mm away from the image's ({reference.source}), "
                f"expected at most {limit:.2f} mm; if the file's affine is known to be wrong, use --label-grid voxel"
            )
    return np.ascontiguousarray(data)
