"""Figures of a benchmark plan (``crln bench``): metric by method, paired differences, pseudo-label quality, μ.

- :func:`plot_metric_by_method`: one bar per table row and checkpoint (the mean over seeds, with the
  pooled bootstrap std), each seed's mean drawn as a point over it;
- :func:`plot_paired_differences`: each row's per-case differences from the reference row, with
  their mean and bootstrap 95 % interval, for Dice and 95HD;
- :func:`plot_pseudo_label_quality`: reliability and Dice of the teacher's pseudo-labels before and
  after rectification over iterations (the CRLN paper's Fig. 1), one row of panels per run that
  logged them;
- :func:`plot_mu`: the learned rectification weight μ over iterations (the paper's Fig. 11).

Per-iteration telemetry is measured on one batch of two unlabelled patches, so the curves are
smoothed with a trailing moving average whose window is stated on the figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crln.comparison import PairedDifference
from crln.methods.base import TimelineMark
from crln.metrics import PERCENT, Metric, metric_of
from crln.report.figures import SavedFigure, legend_if_labelled, point_marker, save_figure, subplots

__all__ = [
    "LoggedRun",
    "MethodScores",
    "plot_metric_by_method",
    "plot_mu",
    "plot_paired_differences",
    "plot_pseudo_label_quality",
    "smooth",
    "smoothing_window",
]

SMOOTH_WINDOW = 25  # at most this many logged points per moving-average window
SMOOTH_FRACTION = 0.05  # and at most this share of a run's logged points (a trailing mean lags by half its window)
BAR_INCHES_PER_ROW = 0.45
QUALITY_PANEL_INCHES = (4.6, 3.0)
ROW_LABEL_WIDTH = 28  # characters per line of a row's run name in the pseudo-label figure


@dataclass(frozen=True)
class LoggedRun:
    """A run's display name, its ``log.jsonl`` records and its method's timeline marks (CRLN's S)."""

    name: str
    records: list[dict[str, Any]]
    marks: tuple[TimelineMark, ...] = ()


@dataclass(frozen=True)
class MethodScores:
    """One table row and checkpoint: its label, each seed's case mean and the pooled
    :func:`crln.metrics.summarize` entry (``boot_mean``, ``boot_std``, ``n``) of one metric."""

    label: str
    seed_means: tuple[float, ...]
    pooled: dict[str, Any]


def smooth(values: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Trailing moving average of a 1-D series; the first points average what exists so far."""
    if values.size == 0:
        return values
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (cumulative[1:] - cumulative[np.arange(values.size) + 1 - counts]) / counts


def smoothing_window(num_points: int) -> int:
    """Moving-average window for a series of ``num_points`` logs: 5% of them, between 1 and 25."""
    return max(1, min(SMOOTH_WINDOW, int(num_points * SMOOTH_FRACTION)))


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    array = np.asarray(points, dtype=float)
    return array[:, 0], array[:, 1]


def _metric(name: str) -> Metric:
    """The registry's metric of ``name`` (:data:`crln.metrics.METRICS`)."""
    found = metric_of(name)
    if found is None:
        raise ValueError(f"{name!r} is not a metric of crln.metrics.METRICS")
    return found[0]


def _axis_label(metric: Metric) -> str:
    return f"{metric.label} (%)" if metric.unit == PERCENT else metric.label


def plot_metric_by_method(
    entries: Sequence[MethodScores], path: str | Path, metric: str = "dice", title: str = ""
) -> SavedFigure | None:
    """Horizontal bars of one metric: bar = mean of the seeds' means, whisker = pooled bootstrap std,
    points = each seed's mean (the seed spread); None when no entry has the metric."""
    shown = _metric(metric)
    scale = shown.scale
    entries = [e for e in entries if e.pooled.get("n", 0) and not np.all(np.isnan(e.seed_means))]
    if not entries:
        return None
    seed_means = [np.asarray(e.seed_means, dtype=float) * scale for e in entries]
    means = np.array([np.nanmean(values) for values in seed_means])
    stds = np.array([e.pooled["boot_std"] * scale for e in entries])
    fig, ax = subplots(figsize=(9.0, 1.2 + BAR_INCHES_PER_ROW * len(entries)))
    positions = np.arange(len(entries))[::-1]
    ax.barh(positions, means, xerr=stds, color="#4c72b0", alpha=0.8, capsize=3)
    for y, values in zip(positions, seed_means):
        ax.plot(values, np.full(values.size, y), "o", color="#dd8452", mec="black", mew=0.5, ms=5, zorder=3)
    for y, mean, std in zip(positions, means, stds):
        ax.text(mean + std, y, f"  {mean:.2f}", va="center", fontsize=8)
    ax.set_yticks(positions, [e.label for e in entries], fontsize=8)
    ax.set_xlabel(
        f"{_axis_label(shown)}: mean over seeds (bar), each seed's mean (points), "
        "bootstrap std over cases × seeds (whisker)",
        fontsize=9,
    )
    if shown.unit == PERCENT:
        lows = [float(np.nanmin(v)) for v in seed_means] + list(means - stds)
        highs = [float(np.nanmax(v)) for v in seed_means] + list(means + stds)
        ax.set_xlim(max(0.0, min(lows) - 5.0), min(100.0, max(highs) + 6.0))
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_paired_differences(
    entries: Sequence[tuple[str, Mapping[str, PairedDifference | None]]], path: str | Path, title: str = ""
) -> SavedFigure | None:
    """One panel per metric (Dice, 95HD): per row, each case's difference from the reference (points),
    the mean difference (diamond) and its bootstrap 95 % interval (line); None when there is nothing to draw."""
    metrics = list(dict.fromkeys(name for _, diffs in entries for name, d in diffs.items() if d is not None))
    if not metrics:
        return None
    fig, axes = subplots(
        1, len(metrics), figsize=(5.5 * len(metrics), 1.4 + BAR_INCHES_PER_ROW * len(entries)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    positions = np.arange(len(entries))[::-1]
    jitter = np.random.default_rng(0)  # spreads the points vertically only, so they do not hide each other
    for ax, metric in zip(axes[0], metrics):
        scale = _metric(metric).scale
        for y, (_, diffs) in zip(positions, entries):
            d = diffs.get(metric)
            if d is None:
                continue
            values = np.asarray(d.differences) * scale
            ax.plot(values, y + jitter.uniform(-0.15, 0.15, values.size), ".", color="#4c72b0", alpha=0.5, ms=4)
            ax.plot([d.ci_low * scale, d.ci_high * scale], [y, y], color="black", lw=2)
            ax.plot(d.mean * scale, y, "D", color="#c44e52", ms=6, zorder=3)
        ax.axvline(0.0, color="grey", ls="--", lw=1)
        better = "higher" if _metric(metric).higher_is_better else "lower"
        ax.set_xlabel(f"Δ {_axis_label(_metric(metric))}, row − reference ({better} is better)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, [label for label, _ in entries], fontsize=8)
    fig.suptitle(
        f"{title}: per case (points), mean (diamond), bootstrap 95 % interval (line)" if title else "", fontsize=10
    )
    return save_figure(fig, path)


QUALITY_PANELS = (
    ("reliable fraction (conf ≥ τ)", "reliable_before", "reliable_after"),
    ("pseudo-label Dice, all voxels", "dice_all_before", "dice_all_after"),
    ("pseudo-label Dice, reliable voxels", "dice_reliable_before", "dice_reliable_after"),
)


def plot_pseudo_label_quality(runs: Sequence[LoggedRun], path: str | Path) -> SavedFigure | None:
    """Fig. 1: pseudo-label reliability and Dice before / after rectification over iterations.

    One row per run that logged ``reliable_before``; None when no run did. Dice is measured against
    the labels of the unlabelled cases, which the method never trains on (monitoring only).
    """
    runs = [run for run in runs if _series(run.records, "reliable_before")[0].size]
    if not runs:
        return None
    cols = len(QUALITY_PANELS)
    fig, axes = subplots(
        len(runs),
        cols,
        figsize=(QUALITY_PANEL_INCHES[0] * cols, QUALITY_PANEL_INCHES[1] * len(runs) + 0.6),
        squeeze=False,
    )
    fig.suptitle(
        "Teacher pseudo-labels before / after rectification "
        f"(faint: as logged; bold: trailing mean over {SMOOTH_FRACTION:.0%} of the logs, at most {SMOOTH_WINDOW})"
    )
    for row, run in zip(axes, runs):
        # The run's name labels the row once (wrapped), so long names do not collide across panels.
        row[0].set_ylabel(textwrap.fill(run.name, ROW_LABEL_WIDTH), fontsize=9)
        for ax, (heading, before, after) in zip(row, QUALITY_PANELS):
            for key, label, color in ((before, "before", "#dd8452"), (after, "after", "#4c72b0")):
                x, y = _series(run.records, key)
                if x.size:
                    ax.plot(x, y, color=color, alpha=0.2, lw=0.8)
                    smoothed = smooth(y, smoothing_window(y.size))
                    ax.plot(
                        x, smoothed, color=color, lw=1.6, marker=point_marker(x.size), label=f"{label} rectification"
                    )
            for mark in run.marks:
                ax.axvline(mark.step, color="grey", ls="--", lw=1, label=mark.label)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(heading, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            legend_if_labelled(ax, fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_mu(runs: Sequence[LoggedRun], path: str | Path) -> SavedFigure | None:
    """Fig. 11: μ over iterations, one line per run that logged it; None when none did."""
    runs = [run for run in runs if _series(run.records, "mu")[0].size]
    if not runs:
        return None
    fig, ax = subplots(figsize=(7.0, 3.8))
    for run in runs:
        x, y = _series(run.records, "mu")
        ax.plot(x, y, lw=1.5, marker=point_marker(x.size), label=run.name)
    for step in sorted({mark.step for run in runs for mark in run.marks}):
        ax.axvline(step, color="grey", ls="--", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("μ  (ȳ_r = ȳ + (1 − μ)·M(x))")
    ax.set_title("Learned rectification weight μ (dashed: S, rectification starts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
