"""Checks on a loaded :class:`~crln.data.case.Case` before it reaches training or evaluation."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crln.data.case import Case
from crln.errors import CrlnError

__all__ = [
    "CHANNEL_STEM_RE",
    "MAX_ABS_INTENSITY",
    "MIN_PATCH_COVERAGE",
    "channel_file_name",
    "check_channel_count",
    "check_channel_numbers",
    "check_channels",
    "check_image_values",
    "check_patch_fits",
    "is_real_numeric",
    "validate_case",
]

#: Largest image magnitude accepted. No modality stores values near it (CT: about ±3e4 HU, MR: up to
#: 65535), while a corrupt or mis-scaled file decodes to values like 1e37 that would silently derail
#: training and inference.
MAX_ABS_INTENSITY = 1e6

#: Along every axis, the largest training volume must fill at least this share of the patch. Volumes
#: smaller than the patch are zero-padded (the field's rule, e.g. LA at 0.5 scale: 44 slices in a
#: 48-slice patch), but a patch that is mostly padding on every volume is a configuration mistake.
MIN_PATCH_COVERAGE = 0.5


def is_real_numeric(dtype: np.dtype) -> bool:
    """Whether voxels of ``dtype`` are real numbers: complex ones would lose a part when cast to float32,
    structured ones (RGB) cannot be cast at all."""
    return bool(np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating))


def _where(case: Case) -> str:
    return case.source or f"case {case.case_id!r}"


def validate_case(
    case: Case,
    *,
    num_classes: int | None = None,
    require_label: bool = False,
    allow_channels: bool = False,
) -> Case:
    """Check a case and return it with its label cast to ``uint8``.

    Checks: image is ``(H, W, D)`` (or ``(C, H, W, D)`` when ``allow_channels``), every voxel is
    finite, the label exists when ``require_label``, the label is ``(H, W, D)`` matching the image's
    spatial shape, holds integers, and (with ``num_classes``) lies in ``[0, num_classes - 1]``.
    A constant image is allowed.

    Raises:
        CrlnError: naming the case's source file, what was found and what was expected.
    """
    where = _where(case)
    image = np.asarray(case.image)
    expected_ndim = "3D (H, W, D) or 4D (C, H, W, D)" if allow_channels else "3D (H, W, D)"
    if image.ndim != 3 and not (allow_channels and image.ndim == 4):
        raise CrlnError(f"{where}: image has shape {image.shape} ({image.ndim}D), expected {expected_ndim}")
    if min(image.shape) < 1:
        raise CrlnError(f"{where}: image has an empty axis, shape {image.shape}")
    if not is_real_numeric(image.dtype):
        raise CrlnError(f"{where}: image dtype is {image.dtype}, expected a real numeric type")
    check_image_values(image, where)
    if case.label is None:
        if require_label:
            raise CrlnError(f"{where}: label is missing, expected a label for this case")
        return case
    label = np.asarray(case.label)
    where = case.label_source or where  # label messages name the label's own file when it has one
    spatial = image.shape[-3:]
    if label.shape != spatial:
        raise CrlnError(f"{where}: label shape {label.shape} differs from image spatial shape {spatial}")
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise CrlnError(f"{where}: label holds non-integer values, expected integer class indices")
    numeric = np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)
    if not numeric and label.dtype != bool:
        raise CrlnError(f"{where}: label dtype is {label.dtype}, expected integer class indices")
    values = np.unique(label)
    hi = 255 if num_classes is None else num_classes - 1
    bad = values[(values < 0) | (values > hi)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        classes = "" if num_classes is None else f" of data.num_classes = {num_classes}"  # the key to change
        raise CrlnError(f"{where}: label values [{shown}] outside the expected range [0, {hi}]{classes}")
    if label.dtype != np.uint8:
        case.label = label.astype(np.uint8)
    return case


def check_image_values(image: np.ndarray, where: str) -> None:
    """Refuse non-finite voxels and magnitudes above :data:`MAX_ABS_INTENSITY` (corrupt or mis-scaled data).

    Args:
        image: any real array, e.g. ``(H, W, D)`` or ``(C, H, W, D)``.
        where: the file or case named in the error.
    """
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        if not finite.all():
            n_nan = int(np.isnan(image).sum())
            n_inf = int(image.size - finite.sum()) - n_nan
            raise CrlnError(
                f"{where}: image has {n_nan} NaN and {n_inf} Inf voxels of {image.size}, expected all finite"
            )
    if image.size == 0:
        return
    lo, hi = float(image.min()), float(image.max())
    if max(-lo, hi) > MAX_ABS_INTENSITY:
        raise CrlnError(
            f"{where}: image intensities in [{lo:.3g}, {hi:.3g}], expected |value| <= {MAX_ABS_INTENSITY:g} "
            "(a corrupt file, or rescale the image)"
        )


def check_channels(case: Case, in_channels: int, whose: str = "") -> None:
    """Refuse an image whose channel count differs from the network's ``in_channels``.

    ``(H, W, D)`` counts as one channel, ``(C, H, W, D)`` as C. The message names every channel file
    and ends with ``whose`` (e.g. " of the checkpoint's network").
    """
    found = 1 if case.image.ndim == 3 else int(case.image.shape[0])
    files = case.channel_sources if len(case.channel_sources) > 1 else (_where(case),)
    check_channel_count(found, in_channels, files, whose)


def check_channel_count(found: int, in_channels: int, files: Sequence[str | Path], whose: str = "") -> None:
    """Refuse ``found`` channels of the image in ``files`` (named in the message) for ``in_channels``: the
    message of :func:`check_channels`, for a reader that knows the count from headers alone.

    Too few channels in nnU-Net channel files ``<case>_0000``, ... name the files that are missing: the
    files there are right, the user has to find the one that is not.
    """
    if found == in_channels:
        return
    message = f"{', '.join(map(str, files))}: image has {found} channel(s), expected model.in_channels = {in_channels}"
    missing = _missing_last_channels(files, in_channels) if found < in_channels else []
    beside = f": no {', '.join(missing)} beside {'it' if len(files) == 1 else 'them'}" if missing else ""
    raise CrlnError(f"{message}{whose}{beside}")


#: nnU-Net's name of a channel file without its ending: ``<case>_<channel, 4 digits>``, e.g. ``case_001_0000``.
CHANNEL_STEM_RE = re.compile(r"^(?P<id>.+)_(?P<ch>\d{4})$")
# the same with the file's ending, e.g. case_001_0000.nii.gz (an ending holds no "_")
_CHANNEL_FILE_RE = re.compile(CHANNEL_STEM_RE.pattern.removesuffix("$") + r"(?P<ending>\.[^_]+)$")


def channel_file_name(case_id: str, channel: int, ending: str) -> str:
    """nnU-Net's name of channel ``channel`` of case ``case_id``: ``<case>_<channel as 4 digits><ending>``."""
    return f"{case_id}_{channel:04d}{ending}"


def _missing_last_channels(files: Sequence[str | Path], in_channels: int) -> list[str]:
    """The names of channel files ``len(files)`` .. ``in_channels - 1`` when ``files`` are a case's channel files
    ``<case>_0000``, ``<case>_0001``, ... in order; ``[]`` for files named otherwise (an MSD 4D file, a scan)."""
    parsed = [_CHANNEL_FILE_RE.match(Path(f).name) for f in files]
    if not all(parsed):
        return []
    case_id, ending = parsed[0]["id"], parsed[0]["ending"]  # type: ignore[index]
    expected = [channel_file_name(case_id, k, ending) for k in range(len(files))]
    if [Path(f).name for f in files] != expected:
        return []
    return [channel_file_name(case_id, k, ending) for k in range(len(files), in_channels)]


def check_channel_numbers(folder: Path, case_id: str, channels: Sequence[tuple[int, Path]], ending: str) -> None:
    """Refuse a case whose nnU-Net channel files in ``folder`` (``(channel, file)``, sorted) are not numbered
    ``0 .. n-1``: the message names the missing files, and says how to name case ids that end in 4 digits
    (``case_0001.nii.gz``, ``case_0002.nii.gz`` read as channels of case ``case``).

    The one check of the dataset reader (:class:`crln.data.nifti.NiftiDataset`) and of ``crln predict``'s grouping
    of a folder's scans, so that both say the same.
    """
    got = [channel for channel, _ in channels]
    if got == list(range(len(got))):
        return
    missing = ", ".join(channel_file_name(case_id, k, ending) for k in range(got[-1]) if k not in got)
    first = channels[0][1].name
    example = first.replace(ending, f"_0000{ending}")
    raise CrlnError(
        f"{folder}: case {case_id!r} has channels {got} but no {missing}, expected channels 0..{got[-1]} "
        f"without a gap (nnU-Net names images <case>_<channel>{ending}; if {first} is one case, name it {example})"
    )


def check_patch_fits(cases: Sequence[Case], patch_size: Sequence[int], key: str = "data.patch_size") -> None:
    """Refuse a patch that would be mostly zero padding on every case.

    Args:
        cases: the training cases, images ``(H, W, D)`` or ``(C, H, W, D)``.
        patch_size: the training patch ``(h, w, d)``.
        key: the config key named in the error.

    Raises:
        CrlnError: along some axis even the largest case fills less than :data:`MIN_PATCH_COVERAGE`
            of the patch.
    """
    if not cases:
        return
    largest = [max(case.shape[axis] for case in cases) for axis in range(3)]
    for axis, (size, patch) in enumerate(zip(largest, patch_size, strict=True)):
        if size < MIN_PATCH_COVERAGE * patch:
            raise CrlnError(
                f"config key {key}: {list(patch_size)} is larger than every training volume (largest extent "
                f"{largest}), so patches would be more than {1 - MIN_PATCH_COVERAGE:.0%} padding along axis {axis}; "
                "expected a patch at most about the volume size"
            )
