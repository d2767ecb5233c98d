"""Checks on a loaded :class:`~crln.data.case.Case` before it reaches training or evaluation."""

from __future__ import annotations

import numpy as np

from crln.data.case import Case
from crln.errors import CrlnError

__all__ = ["validate_case"]


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
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise CrlnError(f"{where}: image dtype is {image.dtype}, expected a real numeric type")
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        if not finite.all():
            n_nan = int(np.isnan(image).sum())
            n_inf = int(image.size - finite.sum()) - n_nan
            raise CrlnError(
                f"{where}: image has {n_nan} NaN and {n_inf} Inf voxels of {image.size}, expected all finite"
            )
    if case.label is None:
        if require_label:
            raise CrlnError(f"{where}: label is missing, expected a label for this case")
        return case
    label = np.asarray(case.label)
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
        raise CrlnError(f"{where}: label values [{shown}] outside the expected range [0, {hi}]")
    if label.dtype != np.uint8:
        case.label = label.astype(np.uint8)
    return case
