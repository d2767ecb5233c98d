"""The field's preprocessing of the three benchmarks, from the public raw formats to the h5 layout.

``crln data prepare <dataset> --src RAW --dst OUT`` runs one of these pipelines:

- ``la``: the 2018 Atrial Segmentation Challenge's training set (``<ID>/lgemri.nrrd`` and
  ``<ID>/laendo.nrrd``, atrium = 255). The image is z-scored over the whole volume, then cropped in
  x and y around the atrium with a margin (every slice kept), as UA-MT's LA h5 files are; output
  ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5``, ``train.list`` (80) / ``test.list`` (20).
- ``pancreas``: NIH Pancreas-CT from TCIA (one DICOM series per ``PANCREAS_<n>`` folder) with the
  NIfTI labels ``label<n>.nii.gz``. Stored values become Hounsfield units (rescale slope and
  intercept), are clipped to [-125, 275] HU, resampled to 1 mm isotropic, cropped around the
  pancreas with a 25 mm margin and z-scored; output ``data/PANCREAS_<n>_norm.h5``,
  ``train.list`` (62) / ``test.list`` (20).
- ``brats``: BraTS 2019 training data (``<ID>/<ID>_flair.nii.gz``, ``<ID>_seg.nii.gz``). FLAIR only,
  cropped to the brain's bounding box (non-zero voxels), clipped at the 99.9th percentile of brain
  intensities and z-scored over brain voxels; the label is the whole tumour (``seg > 0``); output
  ``data/<ID>.h5``, ``train.txt`` (250) / ``val.txt`` (25) / ``test.txt`` (60).

The split is the field's published lists when ``split_dir`` holds them (``train.list`` or
``train.txt`` ...), else a seeded shuffle with the field's proportions (exactly the field's counts
when the raw set has the field's number of cases). Each case file is written atomically and existing
outputs are skipped, so an interrupted run resumes; ``prepare.json`` records the options and, per
case, the source spacing and shape, the crop box and the normalisation statistics.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crln.atomic import atomic_write_text
from crln.data.h5 import read_case_list, write_h5_case
from crln.data.prepare import PREPARE_MANIFEST, _is_within, check_resume_manifest, resample_image, resample_label
from crln.data.raw_io import RawVolume, align_to_grid, read_dicom_series, read_nifti, read_nrrd
from crln.errors import CrlnError

__all__ = [
    "BRATS_CLIP_PERCENTILE",
    "LA_CROP_MARGIN",
    "LA_MIN_CROP",
    "PANCREAS_HU_RANGE",
    "PANCREAS_MARGIN_MM",
    "PANCREAS_SPACING_MM",
    "RAW_DATASETS",
    "crop_box",
    "prepare_brats_raw",
    "prepare_la_raw",
    "prepare_pancreas_raw",
    "prepare_raw_dataset",
    "zscore",
]

#: UA-MT's crop: 10-20 voxels (random) beyond the atrium in x and y; we take the middle, fixed.
LA_CROP_MARGIN = 15
#: ... and at least the LA training patch's side (112) in x and y before the margin.
LA_MIN_CROP = 112
LA_ATRIUM_VALUE = 255
#: The soft-tissue window of the field's Pancreas-CT preprocessing.
PANCREAS_HU_RANGE = (-125.0, 275.0)
PANCREAS_SPACING_MM = 1.0
PANCREAS_MARGIN_MM = 25.0
#: SSL4MIS clips FLAIR where the cumulative histogram reaches 0.999.
BRATS_CLIP_PERCENTILE = 99.9

#: dataset → (split names with the field's case counts, list suffix)
FIELD_SPLITS: dict[str, tuple[dict[str, int], str]] = {
    "la": ({"train": 80, "test": 20}, ".list"),
    "pancreas": ({"train": 62, "test": 20}, ".list"),
    "brats": ({"train": 250, "val": 25, "test": 60}, ".txt"),
}
RAW_DATASETS = tuple(FIELD_SPLITS)
_PROGRESS_EVERY = 10
# Slack, in mm, kept around the pancreas when cropping before resampling, so that interpolation at
# the final crop's border never reads outside the kept block.
_RESAMPLE_SLACK_MM = 4.0
_MIN_STD = 1e-6
_PANCREAS_DIR_RE = re.compile(r"^pancreas_(\d+)$", re.IGNORECASE)
_PANCREAS_LABEL_RE = re.compile(r"^label(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_NIFTI_ENDINGS = (".nii.gz", ".nii")


# --------------------------------------------------------------------------------------------------
# shared steps


def crop_box(
    mask: np.ndarray,
    margin: Sequence[int],
    min_size: Sequence[int] = (0, 0, 0),
    crop_axes: Sequence[bool] = (True, True, True),
) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask`` ``(H, W, D)`` grown to at least ``min_size`` then by ``margin`` per side.

    Axes not in ``crop_axes`` are kept whole. The box is clipped to the volume.

    Raises:
        CrlnError: ``mask`` is empty.
    """
    if not mask.any():
        raise CrlnError("crop: the mask to crop around is empty")
    box = []
    for axis, n in enumerate(mask.shape):
        if not crop_axes[axis]:
            box.append(slice(0, n))
            continue
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(hits[0]), int(hits[-1]) + 1
        grow = max(int(min_size[axis]) - (hi - lo), 0)
        lo -= int(margin[axis]) + grow // 2
        hi += int(margin[axis]) + grow - grow // 2
        box.append(slice(max(lo, 0), min(hi, n)))
    return tuple(box)  # type: ignore[return-value]


def zscore(
    image: np.ndarray, mask: np.ndarray | None = None, *, source: str = "image"
) -> tuple[np.ndarray, float, float]:
    """``(image - mean) / std`` with the statistics over ``mask`` (all voxels when None).

    Returns:
        ``(normalised float32 image, mean, std)``.

    Raises:
        CrlnError: the masked voxels are constant (nothing to normalise), naming ``source``.
    """
    values = image if mask is None else image[mask]
    mean, std = float(values.mean()), float(values.std())
    if not std > _MIN_STD:
        raise CrlnError(f"{source}: intensities are constant ({mean:g}), expected an image to normalise")
    return ((image - mean) / std).astype(np.float32), mean, std


def brats_normalize(
    image: np.ndarray, clip_percentile: float, *, source: str
) -> tuple[np.ndarray, float, float, float]:
    """The BraTS pipeline's intensities: clip at ``clip_percentile`` of the brain voxels (> 0, BraTS being
    skull-stripped), then z-score over them; the background gets the same affine map.

    Args:
        image: one FLAIR volume ``(H, W, D)``, as stored.

    Returns:
        ``(normalised float32 image, clip value, mean, std)``.

    Raises:
        CrlnError: no brain voxels, or constant ones, naming ``source``.
    """
    image = image.astype(np.float32)
    brain = image > 0
    if not brain.any():
        raise CrlnError(f"{source}: no brain voxels (all intensities <= 0), expected a skull-stripped FLAIR")
    ceiling = float(np.percentile(image[brain], clip_percentile))
    normalised, mean, std = zscore(np.minimum(image, ceiling), brain, source=source)
    return normalised, ceiling, mean, std


def scan_normalizer(preparation: dict[str, Any] | None) -> Callable[[np.ndarray, str], np.ndarray] | None:
    """How ``crln predict`` must normalise a raw scan ``(C, H, W, D)`` for a network trained on data that
    ``preparation`` (:func:`crln.data.prepare.recorded_preparation`) wrote; None: the NIfTI reader's own
    per-channel z-score over the whole volume, which is also what the ``la`` pipeline does before its crop.

    Raises:
        CrlnError: a Pancreas-CT network, whose inputs were cropped around the pancreas from its label:
            no raw scan can be prepared the same way.
    """
    dataset = (preparation or {}).get("dataset")
    if dataset == "brats":
        percentile = float(preparation["options"].get("clip_percentile", BRATS_CLIP_PERCENTILE))  # type: ignore[index]

        def normalize(image: np.ndarray, source: str) -> np.ndarray:
            return np.stack([brats_normalize(channel, percentile, source=source)[0] for channel in image])

        return normalize
    if dataset == "pancreas":
        raise CrlnError(
            "the network was trained on volumes `crln data prepare pancreas` wrote (HU window, 1 mm voxels, a crop "
            "around the pancreas taken from its label), and a raw scan cannot be prepared the same way; "
            "expected such prepared volumes (.h5) as inputs"
        )
    return None


def _box_record(box: Sequence[slice]) -> list[list[int]]:
    return [[int(s.start), int(s.stop)] for s in box]


def _integer_label(data: np.ndarray, source: str) -> np.ndarray:
    """``data`` as integer labels >= 0 (integer arrays keep their dtype: a CT-sized int64 copy costs GBs)."""
    if np.issubdtype(data.dtype, np.floating):
        if not np.array_equal(np.round(data), data):
            raise CrlnError(f"{source}: label holds non-integer values, expected integer labels")
        data = data.astype(np.int32)
    elif not np.issubdtype(data.dtype, np.integer):
        raise CrlnError(f"{source}: label has dtype {data.dtype}, expected integer labels")
    if data.size and data.min() < 0:
        raise CrlnError(f"{source}: label holds negative values ({data.min()}), expected labels >= 0")
    return data


@dataclass
class _RawCase:
    case_id: str
    image: Path
    label: Path


def _unique_ids(cases: list[_RawCase], src: Path) -> list[_RawCase]:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise CrlnError(f"{src}: case id {case.case_id!r} found twice ({seen[case.case_id]} and {case.image})")
        seen[case.case_id] = case.image
    return sorted(cases, key=lambda c: c.case_id)


# --------------------------------------------------------------------------------------------------
# splits


def _field_split(ids: list[str], counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Seeded shuffle cut into the field's counts (scaled to ``len(ids)``; every split non-empty when possible)."""
    n, total = len(ids), sum(counts.values())
    names = list(counts)
    if n == total:
        sizes = [counts[k] for k in names]
    else:
        sizes = [round(n * counts[k] / total) for k in names[:-1]]
        if n >= len(names):
            sizes = [max(s, 1) for s in sizes]
        while sum(sizes) > n - (1 if n >= len(names) else 0) and max(sizes) > 1:
            sizes[sizes.index(max(sizes))] -= 1
        sizes.append(n - sum(sizes))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    out, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = order[start : start + size]
        start += size
    return out


def _lists_from(split_dir: Path, names: Sequence[str], available: set[str]) -> dict[str, list[str]]:
    if not split_dir.is_dir():
        raise CrlnError(f"--split-dir {split_dir}: folder not found, expected the field's case lists")
    out = {}
    for name in names:
        ids = read_case_list(split_dir, name)
        missing = [c for c in ids if c not in available]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise CrlnError(f"{split_dir}/{name}: {len(missing)} ids not found in the raw data: {shown}")
        out[name] = ids
    return out


# --------------------------------------------------------------------------------------------------
# the shared driver


def _run_pipeline(
    dataset: str,
    src: Path,
    dst: Path,
    cases: list[_RawCase],
    output_path: Callable[[str], Path],
    process: Callable[[_RawCase], tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    options: dict[str, Any],
    split_dir: str | Path | None,
    seed: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if _is_within(dst, src):
        raise CrlnError(f"{dst}: destination is the source or inside it ({src}), expected a separate folder")
    # numpy seeds only non-negative integers; checked here, before any case is read
    if seed < 0:
        raise CrlnError(f"--seed {seed}: expected an integer >= 0")
    counts, suffix = FIELD_SPLITS[dataset]
    by_id = {c.case_id: c for c in cases}
    if split_dir is not None:
        splits = _lists_from(Path(split_dir), list(counts), set(by_id))
    else:
        splits = _field_split(list(by_id), counts, seed)
    wanted = [cid for name in counts for cid in splits[name]]
    options = {**options, "split": str(split_dir) if split_dir is not None else f"seeded shuffle (seed {seed})"}

    manifest_path = dst / PREPARE_MANIFEST
    previous = check_resume_manifest(dst, dataset, options)
    records: dict[str, Any] = dict(previous.get("cases", {})) if previous else {}

    def write_manifest(cases: list[str]) -> dict[str, Any]:
        manifest = {
            "dataset": dataset,
            "source": str(src),
            "options": options,
            "splits": {name: len(splits[name]) for name in counts},
            "cases": {cid: records[cid] for cid in cases if cid in records},
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        return manifest

    t0 = time.perf_counter()
    written = skipped = 0
    for i, cid in enumerate(wanted, 1):
        out = output_path(cid)
        if out.is_file() and out.stat().st_size > 0 and cid in records:
            skipped += 1
        else:
            image, label, record = process(by_id[cid])
            write_h5_case(out, image, label)
            records[cid] = {**record, "shape": list(image.shape), "file": str(out.relative_to(dst))}
            written += 1
            write_manifest(wanted)  # after every case, so that an interrupted run resumes from here
        if i % _PROGRESS_EVERY == 0 or i == len(wanted):
            log(
                f"prepare {dataset} {src.name} -> {dst.name}: {i}/{len(wanted)} cases ({skipped} skipped), "
                f"{time.perf_counter() - t0:.1f} s"
            )
    for name in counts:
        atomic_write_text(dst / f"{name}{suffix}", "".join(f"{c}\n" for c in splits[name]))
    manifest = write_manifest(wanted)
    return {
        "dataset": dataset,
        "cases": len(wanted),
        "written": written,
        "skipped": skipped,
        "splits": manifest["splits"],
        "seconds": time.perf_counter() - t0,
        "dst": str(dst),
    }


def _check_src(src: Path) -> None:
    if not src.is_dir():
        raise CrlnError(f"{src}: raw dataset folder not found")


def _label_grid(label_grid: str) -> bool:
    if label_grid not in ("affine", "voxel"):
        raise CrlnError(f"--label-grid {label_grid!r}: expected 'affine' or 'voxel'")
    return label_grid == "affine"


# --------------------------------------------------------------------------------------------------
# LA (2018 Atrial Segmentation Challenge, NRRD)


def prepare_la_raw(
    src: str | Path,
    dst: str | Path,
    *,
    margin: int = LA_CROP_MARGIN,
    min_size: int = LA_MIN_CROP,
    label_grid: str = "affine",
    split_dir: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare the LA challenge's raw NRRD training set as the field's h5 dataset (see the module docstring).

    Args:
        src: folder holding ``<ID>/lgemri.nrrd`` and ``<ID>/laendo.nrrd`` (at any depth).
        dst: output folder.
        margin: voxels kept beyond the atrium in x and y.
        min_size: smallest crop side in x and y before the margin.
        label_grid: ``"affine"`` (the label's header must place it on the image's grid) or ``"voxel"``.
        split_dir: folder with the field's ``train.list`` / ``test.list`` (else a seeded 80/20 split).
        seed: seed of the shuffle when there is no ``split_dir``.
        log: progress sink (default: stderr).

    Returns:
        ``{"dataset", "cases", "written", "skipped", "splits", "seconds", "dst"}``.

    Raises:
        CrlnError: no cases, a missing label, a label with values other than 0 and 255, an empty
            atrium, unreadable files, or a bad split list.
    """
    src, dst = Path(src), Path(dst)
    _check_src(src)
    if margin < 0 or min_size < 0:
        raise CrlnError(f"--margin {margin} / min_size {min_size}: expected numbers >= 0")
    use_affine = _label_grid(label_grid)
    cases = []
    for image in src.rglob("lgemri.nrrd"):
        label = image.parent / "laendo.nrrd"
        if not label.is_file():
            raise CrlnError(f"{label}: file not found, expected the atrium label beside {image.name}")
        cases.append(_RawCase(image.parent.name, image, label))
    if not cases:
        raise CrlnError(f"{src}: no <ID>/lgemri.nrrd found, expected the 2018 LA challenge's training set")

    def process(case: _RawCase) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        image = read_nrrd(case.image)
        raw = _integer_label(align_to_grid(read_nrrd(case.label), image, use_affine=use_affine), str(case.label))
        values = set(np.unique(raw).tolist())
        if not values <= {0, LA_ATRIUM_VALUE}:
            raise CrlnError(f"{case.label}: label values {sorted(values)}, expected 0 and {LA_ATRIUM_VALUE} (atrium)")
        label = (raw == LA_ATRIUM_VALUE).astype(np.uint8)
        if not label.any():
            raise CrlnError(f"{case.label}: no atrium voxels (value {LA_ATRIUM_VALUE}), expected a labelled atrium")
        # The field normalises the whole volume, then crops (so a crop's mean is not exactly 0).
        normalised, mean, std = zscore(image.data.astype(np.float32), source=str(case.image))
        box = crop_box(label, (margin, margin, 0), (min_size, min_size, 0), crop_axes=(True, True, False))
        record = {
            "source_shape": list(image.data.shape),
            "source_spacing": list(image.spacing),
            "spacing": list(image.spacing),
            "crop": _box_record(box),
            "intensity_mean": mean,
            "intensity_std": std,
        }
        return normalised[box], label[box], record

    return _run_pipeline(
        "la",
        src,
        dst,
        _unique_ids(cases, src),
        lambda cid: dst / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5",
        process,
        {"margin": margin, "min_size": min_size, "label_grid": label_grid},
        split_dir,
        seed,
        log,
    )


# --------------------------------------------------------------------------------------------------
# Pancreas-CT (NIH / TCIA: DICOM series + NIfTI labels)


def _pancreas_cases(src: Path, labels: Path) -> list[_RawCase]:
    label_files: dict[int, Path] = {}
    for path in labels.rglob("*"):
        m = _PANCREAS_LABEL_RE.match(path.name)
        if m and path.is_file():
            label_files[int(m.group(1))] = path
    cases = []
    for folder in src.rglob("*"):
        m = _PANCREAS_DIR_RE.match(folder.name)
        if not (m and folder.is_dir()):
            continue
        number = int(m.group(1))
        if number not in label_files:
            raise CrlnError(f"{labels}: no label{number:04d}.nii.gz, expected the label of {folder.name}")
        cases.append(_RawCase(folder.name.upper(), folder, label_files[number]))
    if not cases:
        raise CrlnError(f"{src}: no PANCREAS_<n> DICOM folders found, expected the TCIA Pancreas-CT collection")
    return cases


def prepare_pancreas_raw(
    src: str | Path,
    dst: str | Path,
    *,
    labels: str | Path | None = None,
    hu_range: tuple[float, float] = PANCREAS_HU_RANGE,
    spacing_mm: float = PANCREAS_SPACING_MM,
    margin_mm: float = PANCREAS_MARGIN_MM,
    label_grid: str = "affine",
    split_dir: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare NIH Pancreas-CT (DICOM + NIfTI labels) as the field's h5 dataset (see the module docstring).

    Args:
        src: folder holding the ``PANCREAS_<n>/`` DICOM folders (the series at any depth below each).
        dst: output folder.
        labels: folder holding ``label<n>.nii.gz`` (default: searched under ``src``).
        hu_range: clipping window in Hounsfield units.
        spacing_mm: isotropic output voxel size.
        margin_mm: margin kept around the pancreas.
        label_grid: ``"affine"``: the label's NIfTI affine places it on the CT grid (reoriented as
            needed, checked to half a voxel); ``"voxel"``: the label array is already in the CT's
            (column, row, slice) order, slices sorted along the patient axis.
        split_dir: folder with the field's ``train.list`` / ``test.list`` (else a seeded 62/20 split).
        seed: seed of the shuffle when there is no ``split_dir``.
        log: progress sink (default: stderr).

    Returns:
        ``{"dataset", "cases", "written", "skipped", "splits", "seconds", "dst"}``.

    Raises:
        CrlnError: no cases, a missing or misaligned label, an empty pancreas, a bad DICOM series,
            bad options, or a bad split list.
    """
    src, dst = Path(src), Path(dst)
    _check_src(src)
    labels = Path(labels) if labels is not None else src
    if not labels.is_dir():
        raise CrlnError(f"--labels {labels}: folder not found, expected the label<n>.nii.gz files")
    low, high = (float(v) for v in hu_range)
    if not low < high:
        raise CrlnError(f"--hu-range {low:g},{high:g}: expected low < high")
    if not spacing_mm > 0 or margin_mm < 0:
        raise CrlnError(f"--spacing {spacing_mm:g} / --margin {margin_mm:g}: expected spacing > 0 and margin >= 0")
    use_affine = _label_grid(label_grid)

    def process(case: _RawCase) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        ct = read_dicom_series(case.image)
        label_volume = read_nifti(case.label)
        raw = _integer_label(align_to_grid(label_volume, ct, use_affine=use_affine), str(case.label))
        label = (raw > 0).astype(np.uint8)
        if not label.any():
            raise CrlnError(f"{case.label}: no pancreas voxels (label > 0), expected a labelled pancreas")
        image = np.clip(ct.data, low, high)
        # Crop first (with slack) so that resampling touches only the block around the pancreas.
        spacing = np.asarray(ct.spacing, dtype=np.float64)
        slack = [math.ceil((margin_mm + _RESAMPLE_SLACK_MM) / s) for s in spacing]
        block = crop_box(label, slack)
        image, label = image[block], label[block]
        block_shape = image.shape
        size = [max(1, round(n * s / spacing_mm)) for n, s in zip(block_shape, spacing, strict=True)]
        image = resample_image(image, size, "trilinear")
        label = resample_label(label, size, "nearest")
        if not label.any():
            raise CrlnError(f"{case.label}: the pancreas vanished when resampled to {spacing_mm:g} mm")
        margin = [round(margin_mm / spacing_mm)] * 3
        box = crop_box(label, margin)
        normalised, mean, std = zscore(image[box], source=str(case.image))
        record = {
            "source_shape": list(ct.data.shape),
            "source_spacing": list(ct.spacing),
            # the exact output spacing: sizes are rounded to whole voxels
            "spacing": [float(n * s / m) for n, s, m in zip(block_shape, spacing, size, strict=True)],
            "source_block": _box_record(block),
            "crop": _box_record(box),
            "hu_range": [low, high],
            "intensity_mean": mean,
            "intensity_std": std,
        }
        return normalised, label[box], record

    return _run_pipeline(
        "pancreas",
        src,
        dst,
        _unique_ids(_pancreas_cases(src, labels), src),
        lambda cid: dst / "data" / f"{cid}_norm.h5",
        process,
        {
            "hu_range": [low, high],
            "spacing_mm": spacing_mm,
            "margin_mm": margin_mm,
            "label_grid": label_grid,
        },
        split_dir,
        seed,
        log,
    )


# --------------------------------------------------------------------------------------------------
# BraTS 2019 (NIfTI per modality)


def _strip_nifti(name: str, suffix: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(suffix + ending):
            return name[: -len(suffix + ending)]
    return None


def _brats_cases(src: Path) -> list[_RawCase]:
    cases = []
    for flair in src.rglob("*_flair.nii*"):
        cid = _strip_nifti(flair.name, "_flair")
        if cid is None:
            continue
        seg = next(
            (flair.parent / f"{cid}_seg{e}" for e in _NIFTI_ENDINGS if (flair.parent / f"{cid}_seg{e}").is_file()), None
        )
        if seg is None:
            raise CrlnError(
                f"{flair.parent / (cid + '_seg.nii.gz')}: file not found, expected the label beside {flair.name}"
            )
        cases.append(_RawCase(cid, flair, seg))
    if not cases:
        raise CrlnError(f"{src}: no <ID>/<ID>_flair.nii.gz found, expected the BraTS 2019 training data")
    return cases


def prepare_brats_raw(
    src: str | Path,
    dst: str | Path,
    *,
    clip_percentile: float = BRATS_CLIP_PERCENTILE,
    label_grid: str = "affine",
    split_dir: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare BraTS 2019 (FLAIR + seg NIfTI) as the field's h5 dataset (see the module docstring).

    Args:
        src: folder holding ``<ID>/<ID>_flair.nii.gz`` and ``<ID>/<ID>_seg.nii.gz`` (e.g. ``HGG/`` and ``LGG/``).
        dst: output folder.
        clip_percentile: brain intensities above this percentile are clipped to it (100 = off).
        label_grid: ``"affine"`` or ``"voxel"`` (see :func:`prepare_pancreas_raw`).
        split_dir: folder with the field's ``train.txt`` / ``val.txt`` / ``test.txt`` (else a seeded
            250/25/60 split).
        seed: seed of the shuffle when there is no ``split_dir``.
        log: progress sink (default: stderr).

    Returns:
        ``{"dataset", "cases", "written", "skipped", "splits", "seconds", "dst"}``.

    Raises:
        CrlnError: no cases, a missing or misaligned label, an empty brain, bad options, or a bad split list.
    """
    src, dst = Path(src), Path(dst)
    _check_src(src)
    if not 0 < clip_percentile <= 100:
        raise CrlnError(f"--clip-percentile {clip_percentile:g}: expected a number in (0, 100]")
    use_affine = _label_grid(label_grid)

    def process(case: _RawCase) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        flair: RawVolume = read_nifti(case.image)
        raw = _integer_label(align_to_grid(read_nifti(case.label), flair, use_affine=use_affine), str(case.label))
        # The crop keeps every brain voxel, so crln predict's uncropped normalisation has the same statistics.
        normalised, ceiling, mean, std = brats_normalize(flair.data, clip_percentile, source=str(case.image))
        box = crop_box(flair.data > 0, (0, 0, 0))
        normalised, raw = normalised[box], raw[box]
        record = {
            "source_shape": list(flair.data.shape),
            "source_spacing": list(flair.spacing),
            "spacing": list(flair.spacing),
            "crop": _box_record(box),
            "clip_value": ceiling,
            "intensity_mean": mean,
            "intensity_std": std,
            "source_labels": sorted(int(v) for v in np.unique(raw)),
        }
        return normalised, (raw > 0).astype(np.uint8), record

    return _run_pipeline(
        "brats",
        src,
        dst,
        _unique_ids(_brats_cases(src), src),
        lambda cid: dst / "data" / f"{cid}.h5",
        process,
        {"clip_percentile": clip_percentile, "label_grid": label_grid},
        split_dir,
        seed,
        log,
    )


PIPELINES: dict[str, Callable[..., dict[str, Any]]] = {
    "la": prepare_la_raw,
    "pancreas": prepare_pancreas_raw,
    "brats": prepare_brats_raw,
}


def prepare_raw_dataset(dataset: str, src: str | Path, dst: str | Path, **options: Any) -> dict[str, Any]:
    """Run the pipeline of ``dataset`` (one of :data:`RAW_DATASETS`) with its keyword ``options``.

    Raises:
        CrlnError: unknown dataset, or whatever the pipeline raises.
    """
    if dataset not in PIPELINES:
        raise CrlnError(f"dataset {dataset!r}: expected one of {', '.join(RAW_DATASETS)}")
    return PIPELINES[dataset](src, dst, **options)
