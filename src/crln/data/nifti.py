"""nnU-Net / Medical Segmentation Decathlon folders of NIfTI files (read with nibabel).

Layout::

    <root>/dataset.json          optional: file_ending, labels, channel_names (or MSD modality), numTraining
    <root>/imagesTr/<id>_0000.nii.gz [<id>_0001.nii.gz ...]   (nnU-Net; MSD: <id>.nii.gz, maybe 4D)
    <root>/labelsTr/<id>.nii.gz
    <root>/imagesTs/...          optional, same naming (without imagesTr/: a test set to evaluate on)
    <root>/labelsTs/<id>.nii.gz  optional
    <root>/imagesUnlabelled/...  optional (crln): extra training images without labels, same naming
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from crln.atomic import atomic_path
from crln.data.case import Case
from crln.data.transforms import zscore_channels
from crln.data.validate import (
    CHANNEL_STEM_RE,
    check_channel_count,
    check_channel_numbers,
    check_image_values,
    is_real_numeric,
)
from crln.dataset_json import DatasetJson
from crln.errors import CrlnError

__all__ = ["NiftiDataset", "affine_spacing", "load_nifti", "nifti_header", "read_nifti_volume", "write_nifti"]

_AFFINE_TOL = 1e-4
# "unlabeled": crln's optional folder of extra training images that have no labels at all
_SPLIT_DIRS = {
    "train": ("imagesTr", "labelsTr"),
    "test": ("imagesTs", "labelsTs"),
    "unlabeled": ("imagesUnlabelled", "labelsUnlabelled"),
}


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def _decode(path: Path) -> Any:
    """The nibabel image of ``path``; a ``.gz`` file's whole stream is checked first.

    nibabel stops reading a gzip stream once it has the voxels it needs and never checks the CRC-32,
    so a file corrupted in the middle decodes to garbage. Decompressing the whole file once in memory
    verifies every member's CRC and length, and nibabel then parses those bytes without reading the
    file again.
    """
    if not path.name.endswith(".gz"):
        return nib.load(str(path))  # uncompressed: nothing to verify, memory-mapped by nibabel
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise CrlnError(
            f"{path}: unreadable NIfTI file: corrupt gzip stream ({_first_line(exc)}), expected an intact .nii.gz"
        ) from None
    # sizeof_hdr (the first int32, either byte order) tells NIfTI-1 (348) from NIfTI-2 (540).
    nifti2 = 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size along each array axis: the norms of the affine's first three columns (mm)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Return ``(data, affine, spacing)`` of a ``.nii`` / ``.nii.gz`` file, gzip checksum verified.

    ``affine`` is nibabel's best affine (the sform when set, else the qform, else pixdim's scaling) and
    ``spacing`` its voxel size (:func:`affine_spacing`): the header's pixdim may disagree with an sform,
    and distances must be measured on the grid the affine places in the world.

    Raises:
        CrlnError: one line naming the file: missing, empty, corrupt gzip stream, unreadable NIfTI,
            or an affine without a positive finite voxel size along every axis.
    """
    img = _open(path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, ...)
        raise CrlnError(f"{path}: unreadable NIfTI file: {_first_line(exc)}") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = affine_spacing(affine)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise CrlnError(
            f"{path}: affine gives voxel size {spacing}, expected a positive finite size along every axis "
            "(a singular sform/qform)"
        )
    return data, affine, spacing


def _open(path: Path, *, verify: bool = True) -> Any:
    """The nibabel image of ``path``, data not read (``verify``: the whole gzip stream checked first).

    Raises:
        CrlnError: one line naming the file: missing, empty, corrupt gzip stream, unreadable header.
    """
    if not path.is_file():
        raise CrlnError(f"{path}: file not found, expected a NIfTI volume")
    if path.stat().st_size == 0:
        raise CrlnError(f"{path}: file is empty (0 bytes), expected a NIfTI volume")
    try:
        return _decode(path) if verify else nib.load(str(path))
    except CrlnError:
        raise
    except Exception as exc:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, ...)
        raise CrlnError(f"{path}: unreadable NIfTI file: {_first_line(exc)}") from None


def _check_real(dtype: np.dtype, path: Path, what: str) -> None:
    """Refuse complex and structured (RGB) voxels: casting them to float would drop a part or fail."""
    if not is_real_numeric(dtype):
        raise CrlnError(f"{path}: {what} has dtype {dtype}, expected a real numeric array")


def _as_label(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CrlnError(f"{path}: label has shape {data.shape} ({data.ndim}D), expected 3D (H, W, D)")
    if data.dtype != bool:
        _check_real(data.dtype, path, "label")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.isfinite(data).sum())
        if bad:  # NaN passes every comparison below and would become background
            raise CrlnError(f"{path}: label has {bad} NaN or Inf voxels, expected integer class indices")
        rounded = np.round(data)
        if np.abs(data - rounded).max(initial=0.0) > 1e-3:
            raise CrlnError(f"{path}: label holds non-integer values, expected integer class indices")
        data = rounded
    if data.size and (data.min() < 0 or data.max() > 255):
        raise CrlnError(f"{path}: label values in [{data.min()}, {data.max()}], expected class indices in [0, 255]")
    return data.astype(np.uint8)


def _check_image_layout(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> None:
    """Refuse what no image can be: not 3D (or MSD's 4D ``(H, W, D, C)``), not real numbers (header only)."""
    if len(shape) not in (3, 4):
        raise CrlnError(f"{path}: image has shape {shape} ({len(shape)}D), expected 3D (H, W, D)")
    _check_real(dtype, path, "image")


def _as_image(data: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W, D)`` stays; MSD's 4D ``(H, W, D, C)`` becomes channel-first ``(C, H, W, D)``; float32.

    Non-finite and absurd values (see :func:`crln.data.validate.check_image_values`) are refused here,
    on the values as stored, before any normalisation could hide them.
    """
    _check_image_layout(data.shape, data.dtype, path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    image = np.ascontiguousarray(data, dtype=np.float32)
    check_image_values(image, str(path))
    return image


def _check_affine(ref: np.ndarray, other: np.ndarray, ref_path: Path, path: Path) -> None:
    diff = float(np.abs(ref - other).max())
    if diff > _AFFINE_TOL:
        raise CrlnError(
            f"{path}: affine differs from {ref_path.name} by {diff:.3g}, expected equal (tol {_AFFINE_TOL})"
        )


# (path, shape as stored and squeezed, affine) of a case's first channel file
_Channel = tuple[Path, tuple[int, ...], np.ndarray]


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without the trailing 1 of an ``(H, W, D, 1)`` file, which reads as ``(H, W, D)``."""
    return shape[:3] if len(shape) == 4 and shape[-1] == 1 else shape


def _check_channel(path: Path, shape: tuple[int, ...], affine: np.ndarray, first: _Channel | None) -> None:
    """One of a case's several channel files (``shape`` as stored, squeezed): 3D, with the shape and
    affine of the first channel file (``first``; ``None`` while checking that one)."""
    if len(shape) != 3:
        raise CrlnError(f"{path}: channel file has shape {shape}, expected 3D (H, W, D)")
    if first is not None:
        _check_affine(first[2], affine, first[0], path)
        if shape != first[1]:
            raise CrlnError(f"{path}: shape {shape} differs from {first[0].name} shape {first[1]}")


def read_nifti_volume(
    path: str | Path | Sequence[str | Path], case_id: str | None = None, *, normalize: bool = True
) -> Case:
    """Read one NIfTI image (no label): one file, or a case's nnU-Net channel files stacked in order.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file, or the channel files ``<id>_0000``, ``<id>_0001``, ... of one case
            (each 3D, same shape and affine).
        case_id: the case's name; default the first file's name without ending and ``_0000``.
        normalize: z-score each channel (:func:`crln.data.transforms.zscore_channels`), as every
            NIfTI case is for training and evaluation; ``False`` keeps the stored values.

    Returns:
        A :class:`Case` with image ``(H, W, D)`` float32 (4D files or several channel files:
        ``(C, H, W, D)``), the first file's affine and its voxel size (:func:`load_nifti`).

    Raises:
        CrlnError: unreadable file, non-3D channel file, shape or affine mismatch between channels.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    chans: list[np.ndarray] = []
    first: _Channel | None = None
    for p in paths:
        data, affine, voxel_size = load_nifti(p)
        chans.append(_as_image(data, p))
        if len(paths) > 1:
            _check_channel(p, _squeezed(data.shape), affine, first)
        if first is None:  # the case's geometry is the first file's
            first, spacing = (p, _squeezed(data.shape), affine), voxel_size
    image = chans[0] if len(chans) == 1 else np.stack(chans)
    if normalize:
        image = zscore_channels(image)
    if case_id is None:
        stem = paths[0].name
        for ending in (".nii.gz", ".nii"):
            stem = _strip_ending(stem, ending) or stem
        m = CHANNEL_STEM_RE.match(stem)
        case_id = m.group("id") if m else stem
    return Case(
        case_id=case_id,
        image=image,
        label=None,
        spacing=spacing,
        affine=first[2],  # type: ignore[index]
        source=str(paths[0]),
        channel_sources=tuple(str(p) for p in paths) if len(paths) > 1 else (),
    )


def nifti_header(path: str | Path) -> nib.Nifti1Header:
    """The header of the NIfTI file ``path`` (data not read), to give outputs the input's geometry codes."""
    return _open(Path(path), verify=False).header


def _clear_scan_fields(header: nib.Nifti1Header) -> None:
    """Reset the fields of a scan's header that would mislabel an output written on it."""
    header["cal_min"] = header["cal_max"] = 0  # the scan's display window hides a label map's values
    header.set_intent("none")
    header["pixdim"][4:] = 1.0  # e.g. the scan's repetition time, else the step along the classes
    header.set_xyzt_units(header.get_xyzt_units()[0])  # the spatial unit stays, the time unit goes


def write_nifti(
    path: str | Path, array: np.ndarray, affine: np.ndarray | None = None, header: nib.Nifti1Header | None = None
) -> Path:
    """Write ``array`` ``(H, W, D)`` with ``affine`` ``(4, 4)`` atomically (``.nii.gz`` compresses).

    Integer arrays keep their dtype (labels stay uint8); other arrays are written as float32. With
    ``header`` (the input scan's), the output keeps its NIfTI version, qform/sform codes, spatial unit
    and description; what describes the scan's values or time axis is not copied (intensity scaling,
    display range, intent, the 4th axis' step and time unit: a probability map's 4th axis is its classes).
    """
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise CrlnError(f"{path}: output name must end with .nii.gz or .nii")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if header is None:
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm")
    else:
        # a NIfTI-1 image on a NIfTI-2 header would log a "sizeof_hdr" warning: keep the version
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_class(array, affine, header=header.copy())  # nibabel resets the scaling
        img.set_data_dtype(array.dtype)
        _clear_scan_fields(img.header)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


class NiftiDataset:
    """An nnU-Net v2 raw folder or an MSD task folder.

    Example:
        >>> ds = NiftiDataset("Dataset001_Heart")
        >>> case = ds.load(ds.ids("train")[0])   # image (C, H, W, D) or (H, W, D), label (H, W, D)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CrlnError(f"{self.root}: dataset folder not found")
        self.dataset_json = DatasetJson.read(self.root)  # classes, channels, file ending
        self.file_ending: str = self.dataset_json.file_ending
        if not (self.root / "imagesTr").is_dir() and not (self.root / "imagesTs").is_dir():
            raise CrlnError(f"{self.root}: no imagesTr/ or imagesTs/ folder, expected an nnU-Net/MSD dataset")
        self._files: dict[str, dict[str, list[Path]]] = {}

    def __repr__(self) -> str:
        return f"NiftiDataset(root={str(self.root)!r})"

    def _scan(self, split: str) -> dict[str, list[Path]]:
        if split not in _SPLIT_DIRS:
            raise CrlnError(f"{self.root}: split {split!r} unknown, expected one of {sorted(_SPLIT_DIRS)}")
        if split in self._files:
            return self._files[split]
        folder = self.root / _SPLIT_DIRS[split][0]
        files: dict[str, list[tuple[int, Path]]] = {}
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                stem = _strip_ending(p.name, self.file_ending)
                if stem is None or p.name.startswith("."):  # MSD tarballs ship macOS "._x.nii.gz" files
                    continue
                m = CHANNEL_STEM_RE.match(stem)
                cid, ch = (m.group("id"), int(m.group("ch"))) if m else (stem, 0)
                files.setdefault(cid, []).append((ch, p))
        out: dict[str, list[Path]] = {}
        for cid, chans in files.items():
            chans.sort()
            check_channel_numbers(folder, cid, chans, self.file_ending)
            out[cid] = [p for _, p in chans]
        self._files[split] = out
        return out

    def ids(self, split: str = "train") -> list[str]:
        """Case ids of ``imagesTr`` (``"train"``), ``imagesTs`` (``"test"``) or ``imagesUnlabelled``
        (``"unlabeled"``, optional: an empty one is no error), sorted.

        Raises:
            CrlnError: (train, test) the folder is missing, or it exists but no file in it ends in
                ``file_ending`` (said, not an empty list), or an id is in both ``imagesTr/`` and ``imagesTs/``.
        """
        folder = self.root / _SPLIT_DIRS.get(split, ("",))[0]
        if split in ("train", "test") and not folder.is_dir():  # say which folder, not "an empty list"
            raise CrlnError(
                f"{folder}: no such folder, expected the {split} images (<case>_0000{self.file_ending}, "
                f"one file per channel) of the nnU-Net/MSD folder {self.root}"
            )
        if split in ("train", "test"):
            self._refuse_shared("test", "train")
        ids = sorted(self._scan(split))
        if not ids and folder.is_dir() and split != "unlabeled":
            names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            found = f"it holds {len(names)} other files, e.g. {names[0]!r}" if names else "it is empty"
            raise CrlnError(
                f"{folder}: no image file ending in {self.file_ending!r} (file_ending of dataset.json, "
                f"default .nii.gz); {found}"
            )
        return ids

    def _refuse_shared(self, split: str, other: str) -> None:
        """Refuse case ids that the image folders of ``split`` and ``other`` both hold: a case is loaded by
        its id alone, so one of the two scans would silently stand for the other."""
        shared = sorted(set(self._scan(split)) & set(self._scan(other)))
        if shared:
            shown = ", ".join(map(repr, shared[:5])) + (f", ... ({len(shared)} in all)" if len(shared) > 5 else "")
            what = "case {} is" if len(shared) == 1 else "cases {} are"
            raise CrlnError(
                f"{self.root / _SPLIT_DIRS[split][0]}: {what.format(shown)} also in {_SPLIT_DIRS[other][0]}/, "
                "expected distinct case ids"
            )

    def _split_of(self, case_id: str) -> str:
        found = [split for split in _SPLIT_DIRS if case_id in self._scan(split)]
        if not found:
            raise CrlnError(f"{self.root}: case {case_id!r} not found in imagesTr/, imagesTs/ or imagesUnlabelled/")
        if len(found) > 1:
            self._refuse_shared(found[1], found[0])
        return found[0]

    def image_paths(self, case_id: str) -> list[Path]:
        """Channel files of ``case_id`` in channel order."""
        return self._scan(self._split_of(case_id))[case_id]

    def label_path(self, case_id: str) -> Path:
        """Label file of ``case_id`` (may not exist for test cases)."""
        return self.root / _SPLIT_DIRS[self._split_of(case_id)][1] / f"{case_id}{self.file_ending}"

    def labeled_ids(self, split: str = "train") -> list[str]:
        """Ids of ``split`` whose label file exists, sorted (the others are unlabelled images)."""
        return [cid for cid in self.ids(split) if self.label_path(cid).is_file()]

    def unlabeled_ids(self) -> list[str]:
        """Ids of ``imagesUnlabelled/`` (optional; extra unlabelled training images), sorted.

        Raises:
            CrlnError: an id is also in ``imagesTr/`` or ``imagesTs/`` (which case would be meant?).
        """
        for split in ("train", "test"):
            self._refuse_shared("unlabeled", split)
        return self.ids("unlabeled")

    def orphan_labels(self, split: str = "train") -> list[Path]:
        """Label files of ``split`` without an image (ignored by every command), sorted."""
        folder = self.root / _SPLIT_DIRS[split][1]
        if not folder.is_dir():
            return []
        images = self._scan(split)
        return [
            p
            for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and _strip_ending(p.name, self.file_ending) not in (*images, None)
        ]

    def load(self, case_id: str, with_label: bool = True, *, normalize: bool = True) -> Case:
        """Read one case: image ``(H, W, D)`` or ``(C, H, W, D)`` float32, label ``(H, W, D)`` uint8.

        Each channel is z-scored over its voxels (``normalize``; see
        :func:`crln.data.transforms.zscore_channels`); spacing is kept as stored, never resampled.
        Test cases without a label file load with ``label=None``; training cases require one.

        Raises:
            CrlnError: unreadable file, non-3D volume, shape or affine mismatch between channels and label.
        """
        case = read_nifti_volume(self.image_paths(case_id), case_id, normalize=normalize)
        lpath = self.label_path(case_id)
        if with_label and (lpath.is_file() or self._split_of(case_id) == "train"):
            ldata, laff, _ = load_nifti(lpath)
            label = _as_label(ldata, lpath)
            if label.shape != case.image.shape[-3:]:
                raise CrlnError(
                    f"{lpath}: label shape {label.shape} differs from image spatial shape {case.image.shape[-3:]}"
                )
            _check_affine(case.affine, laff, Path(case.source), lpath)
            case.label, case.label_source = label, str(lpath)
        return case

    def load_many(self, ids: list[str], with_label: bool = True) -> list[Case]:
        """Load several cases in order."""
        return [self.load(cid, with_label=with_label) for cid in ids]


# hooks of the format registry (crln.data_formats)


def detect_root(root: Path) -> bool:
    """Whether ``root`` is an nnU-Net/MSD folder: an ``imagesTr/`` or ``imagesTs/`` folder (a held-out
    test set alone is a dataset to evaluate on, as :class:`NiftiDataset` reads it)."""
    return (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()


def open_root(root: Path) -> NiftiDataset:
    """The NIfTI dataset in ``root``."""
    return NiftiDataset(root)


def read_scan(paths: list[Path], case_id: str, *, normalize: bool = True) -> Case:
    """One NIfTI scan, or a case's nnU-Net channel files stacked ``(C, H, W, D)``, for ``crln predict``
    (z-scored per channel, or as stored with ``normalize=False``)."""
    return read_nifti_volume(paths, case_id, normalize=normalize)


def check_scan(paths: Sequence[str | Path], in_channels: int | None = None) -> None:
    """What :func:`read_nifti_volume` checks that the headers alone tell, no voxel read (so ``crln
    predict`` checks every input before any inference): every file readable, an image 3D (or MSD's 4D)
    of real numbers, several channel files each 3D with one shape and affine, and (with ``in_channels``,
    the network's) as many channels as the network takes.

    Raises:
        CrlnError: naming the file, as :func:`read_nifti_volume` (or the channel check after it) would.
    """
    first: _Channel | None = None
    for p in map(Path, paths):
        img = _open(p, verify=False)
        _check_image_layout(img.shape, img.get_data_dtype(), p)
        if len(paths) > 1:
            _check_channel(p, _squeezed(img.shape), img.affine, first)
        first = first or (p, _squeezed(img.shape), img.affine)
    if in_channels is not None and first is not None:
        found = len(paths) if len(paths) > 1 else first[1][3] if len(first[1]) == 4 else 1
        check_channel_count(found, in_channels, paths, " of the checkpoint's network")
