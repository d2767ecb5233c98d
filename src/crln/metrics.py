"""Segmentation metrics with the semantics of ``medpy.metric.binary``, and their summary.

The field (UA-MT, MC-Net, CRLN, …) reports Dice, Jaccard, ASD and 95HD computed by
``medpy.metric.binary.{dc, jc, asd, hd95}(pred, gt)``. This module reimplements those four
functions (medpy is GPL-3.0, so it is only a test oracle here) with identical values:

* masks are binarised as ``mask != 0``;
* a surface is ``mask XOR binary_erosion(mask)`` with the 6-connected structure
  (``generate_binary_structure(3, 1)``) and scipy's default ``border_value=0``, so object voxels
  on the volume border are surface voxels;
* the distance of a surface voxel is the Euclidean distance (axes scaled by ``spacing``) to the
  nearest surface voxel of the other mask, the value medpy reads from
  ``distance_transform_edt(~surface, sampling=spacing)``;
* ``asd(pred, gt)`` is medpy's *directed* average surface distance: the mean distance from each
  surface voxel of ``pred`` to the nearest surface voxel of ``gt`` (the number the field's
  tables report). :func:`assd` is medpy's symmetric version (mean of the pooled distances of
  both directions);
* ``hd95`` is the 95th percentile (``np.percentile``, linear interpolation) of the distances of
  both directions pooled together, not the larger of two one-way percentiles.

Speed without changing values (``benchmarks/bench_metrics.py``): surfaces are extracted on the
bounding box of ``pred | gt`` only (exact: outside the box everything is background, which is what
the erosion's ``border_value=0`` assumes); nearest-surface distances come from a k-d tree over the
surface voxels instead of full-volume distance transforms (the same distances up to floating-point
rounding, ~1e-15 with a non-unit spacing; an exact distance transform restricted to the box was
measured slower); a surface voxel that is also a surface voxel of the other mask gets its distance
0 without a query; and :func:`case_metrics` computes ASD and 95HD from one pair of distance sets
(one :class:`MaskPair` per class; :func:`asd_and_hd95` for scripts), where medpy's ``asd`` and
``hd95`` compute three distance transforms between them.

Empty masks (medpy raises for ASD/95HD and the field's scripts then score the case 0 on every
metric, which reads as a perfect 95HD):

* both empty: dice 1, jaccard 1, asd 0, hd95 0 (the prediction is right);
* exactly one empty: dice 0, jaccard 0, asd and hd95 ``NaN`` (a distance to nothing is undefined).

:func:`summarize` never lets a ``NaN`` into a mean: per metric it reports ``n_undefined`` (how many
cases had ``NaN``) and computes the plain and bootstrapped statistics over the defined cases only
(``n`` is that count). A run whose predictions are empty on some cases therefore shows it in
``n_undefined`` next to the 95HD instead of hiding it in a low mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from crln.errors import CrlnError

__all__ = [
    "METRICS",
    "MaskPair",
    "Metric",
    "asd",
    "asd_and_hd95",
    "assd",
    "bootstrap",
    "case_metrics",
    "dice",
    "hd95",
    "jaccard",
    "keep_largest_component",
    "mean_foreground_dice",
    "metric_of",
    "per_class_metric_names",
    "resample_means",
    "summarize",
]

Spacing = Sequence[float] | float | None


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays (nonzero = object, as medpy), checked to have the same shape."""
    pred_b = np.asarray(pred, dtype=bool)  # no copy when already bool
    gt_b = np.asarray(gt, dtype=bool)
    if pred_b.shape != gt_b.shape:
        raise CrlnError(f"metrics: prediction shape {pred_b.shape} does not match label shape {gt_b.shape}")
    return pred_b, gt_b


def _spacing(spacing: Spacing, ndim: int) -> tuple[float, ...] | None:
    """``spacing`` as one positive finite float per axis (a scalar applies to all axes)."""
    if spacing is None:
        return None
    values = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(v) for v in spacing)  # type: ignore[arg-type]
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise CrlnError(f"metrics: spacing {tuple(values)} is not {ndim} positive numbers (one per image axis)")
    return values


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2|P∩G| / (|P|+|G|)`` (medpy ``dc``); 1.0 when both masks are empty.

    Args:
        pred: predicted mask, any shape, e.g. ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.

    Returns:
        Dice in ``[0, 1]``.

    Raises:
        CrlnError: the shapes differ.
    """
    p, g = _binary_pair(pred, gt)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(p & g) / float(total)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index ``|P∩G| / |P∪G|`` (medpy ``jc``); 1.0 when both masks are empty.

    Args:
        pred: predicted mask, e.g. ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.

    Returns:
        Jaccard in ``[0, 1]``.

    Raises:
        CrlnError: the shapes differ.
    """
    p, g = _binary_pair(pred, gt)
    union = np.count_nonzero(p | g)
    if union == 0:
        return 1.0
    return np.count_nonzero(p & g) / float(union)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred→gt, gt→pred)`` of two non-empty bool masks (medpy's rule)."""
    # Erode only the union's bounding box: outside it everything is background, which is what
    # border_value=0 assumes, so the surfaces are exactly medpy's.
    union = pred | gt
    box = []
    for axis in range(pred.ndim):
        present = np.flatnonzero(np.any(union, axis=tuple(a for a in range(pred.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    p, g = pred[tuple(box)], gt[tuple(box)]
    footprint = ndimage.generate_binary_structure(p.ndim, 1)
    p_surface = p ^ ndimage.binary_erosion(p, structure=footprint, iterations=1)
    g_surface = g ^ ndimage.binary_erosion(g, structure=footprint, iterations=1)
    scale = np.ones(p.ndim) if spacing is None else np.asarray(spacing)
    p_points, g_points = np.argwhere(p_surface) * scale, np.argwhere(g_surface) * scale
    # Nearest-surface-voxel distances, the values medpy reads from distance_transform_edt(~surface)
    # at the other surface's voxels; a k-d tree over the surface voxels avoids the full EDTs.
    # Voxels on both surfaces are at distance 0 and skip the query; the distances stay in medpy's
    # (C) order, so that their sums round exactly as medpy's do.
    return (
        _nearest_distances(p_points, g_points, shared=g_surface[p_surface]),
        _nearest_distances(g_points, p_points, shared=p_surface[g_surface]),
    )


def _nearest_distances(points: np.ndarray, targets: np.ndarray, *, shared: np.ndarray) -> np.ndarray:
    """Distance of each of ``points`` ``(N, ndim)`` to the nearest of ``targets`` ``(M, ndim)``; 0 where
    ``shared`` ``(N,)`` says the point is itself a target."""
    distances = np.zeros(len(points))
    query = ~shared
    if query.any():
        distances[query] = cKDTree(targets).query(points[query], k=1, workers=-1)[0]  # all cores; same values
    return distances


def _distances_or_none(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """The two directed distance sets, or ``None`` when exactly one mask is empty (undefined)."""
    p, g = _binary_pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return np.zeros(1), np.zeros(1)  # both empty: perfect, distance 0
    if p_any != g_any:
        return None
    return _surface_distances(p, g, sp)


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """Average surface distance from ``pred``'s surface to ``gt``'s (medpy ``asd``, directed).

    Args:
        pred: predicted mask ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.
        spacing: voxel size per axis (or one number for all); ``None`` means 1 (voxel units).

    Returns:
        The mean distance; 0.0 when both masks are empty, ``NaN`` when exactly one is.

    Raises:
        CrlnError: the shapes differ or the spacing is not one positive number per axis.
    """
    return _pair_asd(MaskPair(pred, gt, spacing))


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """Average symmetric surface distance (medpy 0.5 ``assd``): mean of both directions' distances pooled.

    Args:
        pred: predicted mask ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.
        spacing: voxel size per axis (or one number for all); ``None`` means 1.

    Returns:
        The mean distance; 0.0 when both masks are empty, ``NaN`` when exactly one is.

    Raises:
        CrlnError: the shapes differ or the spacing is invalid.
    """
    dists = _distances_or_none(pred, gt, spacing)
    return math.nan if dists is None else float(np.concatenate(dists).mean())


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """95th percentile Hausdorff distance (medpy ``hd95``): both directions' distances pooled.

    Args:
        pred: predicted mask ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.
        spacing: voxel size per axis (or one number for all); ``None`` means 1.

    Returns:
        ``np.percentile(concat(pred→gt, gt→pred), 95)``; 0.0 when both masks are empty, ``NaN``
        when exactly one is.

    Raises:
        CrlnError: the shapes differ or the spacing is invalid.
    """
    return _pair_hd95(MaskPair(pred, gt, spacing))


def asd_and_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> tuple[float, float]:
    """:func:`asd` and :func:`hd95` of one pair from one computation of the surface distances.

    Args:
        pred: predicted mask ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.
        spacing: voxel size per axis (or one number for all); ``None`` means 1.

    Returns:
        ``(asd, hd95)``, each exactly the value of its own function (both ``NaN`` when exactly one
        mask is empty, both 0.0 when both are).

    Raises:
        CrlnError: the shapes differ or the spacing is invalid.
    """
    pair = MaskPair(pred, gt, spacing)
    return _pair_asd(pair), _pair_hd95(pair)


class MaskPair:
    """One binary (prediction, reference) pair whose surface distances are computed once, on first use,
    however many of the :data:`METRICS` read them.

    Args:
        pred: predicted mask ``(H, W, D)``; nonzero is object.
        gt: reference mask of the same shape.
        spacing: voxel size per axis (or one number for all); ``None`` means 1.
    """

    def __init__(self, pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> None:
        self.pred, self.gt, self.spacing = pred, gt, spacing

    @cached_property
    def distances(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The directed surface distances ``(pred→gt, gt→pred)``; ``None`` when exactly one mask is empty."""
        return _distances_or_none(self.pred, self.gt, self.spacing)


def _pair_asd(pair: MaskPair) -> float:
    return math.nan if pair.distances is None else float(pair.distances[0].mean())


def _pair_hd95(pair: MaskPair) -> float:
    return math.nan if pair.distances is None else float(np.percentile(np.concatenate(pair.distances), 95))


#: :attr:`Metric.unit` of a fraction in [0, 1], shown in per cent.
PERCENT = "%"
#: :attr:`Metric.unit` of a distance, in the data's unit (``voxels`` for h5 data, ``mm`` for NIfTI).
DISTANCE = "distance"


@dataclass(frozen=True)
class Metric:
    """One evaluation metric: how it is computed on a binary pair, and how tables and figures show it."""

    name: str  # the key in per_case.csv and summary.json
    compute: Callable[[MaskPair], float]
    unit: str  # PERCENT or DISTANCE
    label: str  # the name people read: "Dice", "95HD"
    higher_is_better: bool

    @property
    def scale(self) -> float:
        """The factor from stored value to shown value (100 for a percentage)."""
        return 100.0 if self.unit == PERCENT else 1.0

    def unit_text(self, distance_unit: str) -> str:
        """``%``, or the data's distance unit (``voxels``, ``mm``)."""
        return PERCENT if self.unit == PERCENT else distance_unit


#: Every metric of an evaluation, in column order. Adding a metric here adds it to ``per_case.csv``,
#: ``summary.json``, ``crln evaluate``'s table, the report and the bench tables.
METRICS: tuple[Metric, ...] = (
    Metric("dice", lambda pair: dice(pair.pred, pair.gt), PERCENT, "Dice", higher_is_better=True),
    Metric("jaccard", lambda pair: jaccard(pair.pred, pair.gt), PERCENT, "Jaccard", higher_is_better=True),
    Metric("asd", _pair_asd, DISTANCE, "ASD", higher_is_better=False),
    Metric("hd95", _pair_hd95, DISTANCE, "95HD", higher_is_better=False),
)


def metric_of(name: str) -> tuple[Metric, str] | None:
    """The metric of a result key and its class: ``(dice, "")`` for ``dice``, ``(dice, "2")`` for
    ``dice_2``; ``None`` for a key that is no metric (``case``, ``seconds``)."""
    by_name = {m.name: m for m in METRICS}
    if name in by_name:
        return by_name[name], ""
    base, _, cls = name.rpartition("_")
    return (by_name[base], cls) if base in by_name and cls.isdigit() else None


def per_class_metric_names(names: Iterable[str]) -> list[str]:
    """The per-class metric names among ``names`` (``dice_1``, ``jaccard_1``, ..., ``hd95_2``, ...),
    grouped by class in :data:`METRICS` order; empty for a binary task."""
    present = set(names)
    found = [metric_of(name) for name in present]
    classes = sorted({int(cls) for hit in found if hit is not None and (cls := hit[1])})
    return [f"{m.name}_{c}" for c in classes for m in METRICS if f"{m.name}_{c}" in present]


def _binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> dict[str, float]:
    """Every metric of :data:`METRICS` on one binary pair, computing the surface distances once."""
    pair = MaskPair(pred, gt, spacing)
    return {metric.name: metric.compute(pair) for metric in METRICS}


def mean_foreground_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes ``1..C-1`` of two label maps ``(H, W, D)`` (empty vs empty
    = 1): the ``dice`` of :func:`case_metrics`, without the distances (validation, figures)."""
    pred_a, gt_a = np.asarray(pred), np.asarray(gt)
    return float(np.mean([dice(pred_a == c, gt_a == c) for c in range(1, max(num_classes, 2))]))


def case_metrics(pred: np.ndarray, gt: np.ndarray, *, num_classes: int, spacing: Spacing = None) -> dict[str, float]:
    """Every metric of :data:`METRICS` (Dice, Jaccard, ASD and 95HD) of one case.

    Args:
        pred: predicted label map ``(H, W, D)`` of class indices.
        gt: reference label map ``(H, W, D)`` of class indices.
        num_classes: number of classes including background (2 for a binary task).
        spacing: voxel size per axis, or ``None`` for voxel units.

    Returns:
        For ``num_classes == 2``: ``{"dice", "jaccard", "asd", "hd95"}`` of the foreground (label 1).
        For more classes: ``"dice_1", …, "hd95_{C-1}"`` per foreground class, plus the plain names
        holding the mean over the foreground classes. A class whose distance is undefined (``NaN``)
        makes that plain-name mean ``NaN`` too, so :func:`summarize` counts the case as undefined.

    Raises:
        CrlnError: ``num_classes < 2``, shapes differ or the spacing is invalid.
    """
    if num_classes < 2:
        raise CrlnError(f"metrics: num_classes is {num_classes}, expected at least 2 (background + foreground)")
    pred_a, gt_a = np.asarray(pred), np.asarray(gt)
    if num_classes == 2:
        return _binary_metrics(pred_a == 1, gt_a == 1, spacing)
    out: dict[str, float] = {}
    per_class = [_binary_metrics(pred_a == c, gt_a == c, spacing) for c in range(1, num_classes)]
    for metric in METRICS:
        out[metric.name] = float(np.mean([m[metric.name] for m in per_class]))
    for c, m in enumerate(per_class, start=1):
        out.update({f"{name}_{c}": value for name, value in m.items()})
    return out


def bootstrap(values: Sequence[float], *, n_resamples: int = 100, seed: int = 0) -> tuple[float, float]:
    """Bootstrap mean and standard deviation of the case mean.

    Draws ``n_resamples`` resamples of ``len(values)`` cases with replacement
    (``np.random.default_rng(seed).integers``), takes the mean of each resample, and returns the
    mean and the standard deviation (``ddof=0``) of those resample means, i.e. the bootstrap
    estimate of the case mean and its standard error. ``NaN`` values must be removed by the caller.

    Args:
        values: one value per case.
        n_resamples: number of bootstrap resamples (100 in the CRLN paper).
        seed: seed of the resampling; the same seed gives the same result.

    Returns:
        ``(mean, std)`` of the resample means; ``(nan, nan)`` when ``values`` is empty.

    Raises:
        CrlnError: ``n_resamples < 1``.
    """
    means = resample_means(values, n_resamples=n_resamples, seed=seed)
    if means.size == 0:
        return math.nan, math.nan
    return float(means.mean()), float(means.std())


def resample_means(values: Sequence[float], *, n_resamples: int = 100, seed: int = 0) -> np.ndarray:
    """The means of ``n_resamples`` bootstrap resamples of ``values`` (the draws behind :func:`bootstrap`).

    Args:
        values: one value per case, without ``NaN``.
        n_resamples: number of resamples, each of ``len(values)`` cases drawn with replacement
            (``np.random.default_rng(seed).integers``).
        seed: seed of the resampling.

    Returns:
        ``(n_resamples,)`` resample means; empty when ``values`` is.

    Raises:
        CrlnError: ``n_resamples < 1``.
    """
    if n_resamples < 1:
        raise CrlnError(f"bootstrap: n_resamples is {n_resamples}, expected at least 1")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    return data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)


def summarize(
    per_case: list[Mapping[str, float]], *, n_resamples: int = 100, seed: int = 0
) -> dict[str, dict[str, float | int]]:
    """Per-metric summary of per-case metrics, with ``NaN`` (undefined distance) handled explicitly.

    Args:
        per_case: one dict per case, e.g. the outputs of :func:`case_metrics`. Keys may differ
            between cases; each metric is summarised over the cases that have it.
        n_resamples: bootstrap resamples (see :func:`bootstrap`).
        seed: bootstrap seed.

    Returns:
        ``{metric: {"mean", "std", "boot_mean", "boot_std", "n", "n_undefined"}}`` where ``mean``
        and ``std`` (``ddof=0``) are over the ``n`` cases with a defined (non-``NaN``) value, the
        bootstrap figures are over those same cases, and ``n_undefined`` counts the ``NaN`` cases.
        All four statistics are ``NaN`` when ``n == 0``.
    """
    names: list[str] = []
    for row in per_case:
        names.extend(k for k in row if k not in names)
    summary: dict[str, dict[str, float | int]] = {}
    for name in names:
        column = np.asarray([float(row[name]) for row in per_case if name in row], dtype=np.float64)
        defined = column[~np.isnan(column)]
        boot_mean, boot_std = bootstrap(defined, n_resamples=n_resamples, seed=seed)
        summary[name] = {
            "mean": float(defined.mean()) if defined.size else math.nan,
            "std": float(defined.std()) if defined.size else math.nan,
            "boot_mean": boot_mean,
            "boot_std": boot_std,
            "n": int(defined.size),
            "n_undefined": int(column.size - defined.size),
        }
    return summary


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (the field's ``getLargestCC``).

    26-connectivity (faces, edges and corners) matches ``skimage.measure.label``'s default for
    3D, which the field's post-processing uses. Ties keep the component with the lowest label
    (first in C order).

    Args:
        mask: binary mask ``(H, W, D)`` (nonzero is object; any number of dimensions works).

    Returns:
        A bool mask of the same shape: the largest component, or all ``False`` for an empty mask.
    """
    binary = np.asarray(mask).astype(bool)
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    labels, count = ndimage.label(binary, structure=structure)
    if count <= 1:
        return binary
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background is not a component
    return labels == int(np.argmax(sizes))
