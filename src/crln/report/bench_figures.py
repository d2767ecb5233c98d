"""Figures of a benchmark plan (``crln bench``): metric by method, pseudo-label quality, μ.

- :func:`plot_metric_by_method`: one bar per table row, bootstrapped mean ± std;
- :func:`plot_pseudo_label_quality`: reliability and Dice of the teacher's pseudo-labels before and
  after rectification over iterations (the CRLN paper's Fig. 1), one row of panels per run that
  logged them;
- :func:`plot_mu`: the learned rectification weight μ over iterations (the paper's Fig. 11).

Per-iteration telemetry is measured on one batch of two unlabelled patches, so the curves are
smoothed with a trailing moving average whose window is stated on the figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from crln.report.figures import SavedFigure, save_figure

__all__ = ["LoggedRun", "plot_metric_by_method", "plot_mu", "plot_pseudo_label_quality", "smooth", "smoothing_window"]

METRIC_LABELS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "asd": "ASD", "hd95": "95HD"}
PERCENT_METRICS = ("dice", "jaccard")
SMOOTH_WINDOW = 25  # at most this many logged points per moving-average window
SMOOTH_FRACTION = 0.05  # and at most this share of a run's logged points (a trailing mean lags by half its window)
BAR_INCHES_PER_ROW = 0.45
QUALITY_PANEL_INCHES = (4.6, 3.0)
ROW_LABEL_WIDTH = 28  # characters per line of a row's run name in the pseudo-label figure


@dataclass(frozen=True)
class LoggedRun:
    """A run's display name, its ``log.jsonl`` records and CRLN's S (None for other methods)."""

    name: str
    records: list[dict[str, Any]]
    rectify_start: int | None = None


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


def plot_metric_by_method(
    rows: Sequence[dict[str, Any]], path: str | Path, metric: str = "dice", title: str = ""
) -> SavedFigure | None:
    """Horizontal bars of one metric per table row (``row["name"]``, ``row["seed"]`` and
    ``row["metrics"][metric]`` with ``boot_mean``/``boot_std``); None when no row has it."""
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    entries = [
        (f"{row['name']} (seed {row['seed']})", row["metrics"][metric])
        for row in rows
        if row.get("metrics", {}).get(metric, {}).get("n", 0)
    ]
    if not entries:
        return None
    labels = [label for label, _ in entries]
    means = np.array([stats["boot_mean"] * scale for _, stats in entries])
    stds = np.array([stats["boot_std"] * scale for _, stats in entries])
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + BAR_INCHES_PER_ROW * len(entries)), layout="constrained")
    positions = np.arange(len(entries))[::-1]
    ax.barh(positions, means, xerr=stds, color="#4c72b0", capsize=3)
    for y, mean, std in zip(positions, means, stds):
        ax.text(mean + std, y, f"  {mean:.2f}", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric)}: bootstrapped mean ± std over test cases", fontsize=9)
    if metric in PERCENT_METRICS:
        low = max(0.0, float((means - stds).min()) - 5.0)
        ax.set_xlim(low, min(100.0, float((means + stds).max()) + 6.0))
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
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
    fig, axes = plt.subplots(
        len(runs),
        cols,
        figsize=(QUALITY_PANEL_INCHES[0] * cols, QUALITY_PANEL_INCHES[1] * len(runs) + 0.6),
        squeeze=False,
        layout="constrained",
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
                    ax.plot(x, smooth(y, smoothing_window(y.size)), color=color, lw=1.6, label=f"{label} rectification")
            if run.rectify_start is not None:
                ax.axvline(run.rectify_start, color="grey", ls="--", lw=1, label="S")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(heading, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_mu(runs: Sequence[LoggedRun], path: str | Path) -> SavedFigure | None:
    """Fig. 11: μ over iterations, one line per run that logged it; None when none did."""
    runs = [run for run in runs if _series(run.records, "mu")[0].size]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 3.8), layout="constrained")
    for run in runs:
        x, y = _series(run.records, "mu")
        ax.plot(x, y, lw=1.5, label=run.name)
    starts = {run.rectify_start for run in runs if run.rectify_start is not None}
    for start in sorted(starts):
        ax.axvline(start, color="grey", ls="--", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("μ  (ȳ_r = ȳ + (1 − μ)·M(x))")
    ax.set_title("Learned rectification weight μ (dashed: S, rectification starts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
