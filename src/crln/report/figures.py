"""The report's figures, drawn offscreen on :class:`matplotlib.figure.Figure` objects (no display needed).

No figure goes through ``pyplot`` (:func:`subplots`), and no backend is chosen here: a notebook that builds
a report keeps its own backend and open figures. ``Figure.savefig`` renders the PNGs with Agg.

Every figure has a fixed size in pixels (``figsize × DPI``, never ``bbox_inches="tight"``), so a
reader (and the tests) know the PNG's dimensions in advance; :func:`save_figure` returns them.

- :func:`plot_training_curves`: every logged loss term, the learning rate, μ, pseudo-label
  reliability and Dice before / after rectification, validation Dice (paper Fig. 1-style telemetry);
- :func:`plot_slice_overlay`: image with ground-truth and prediction contours in three orthogonal
  planes through the object's centre, and the confidence (max softmax) map (Fig. 9);
- :func:`plot_surface_render`: marching-cubes surfaces of ground truth and prediction, the
  prediction coloured by its distance to the ground-truth surface (Fig. 11/14);
- :func:`plot_rectification`: teacher pseudo-label, ``M(x)`` and rectified pseudo-label on one
  patch (Fig. 8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from crln.atomic import atomic_path

if TYPE_CHECKING:
    from crln.methods.base import TimelineMark

__all__ = [
    "DPI",
    "SavedFigure",
    "curve_panels",
    "legend_if_labelled",
    "object_centre",
    "plot_rectification",
    "plot_slice_overlay",
    "plot_surface_render",
    "plot_training_curves",
    "point_marker",
    "save_figure",
    "subplots",
]

DPI = 100
GT_COLOR = "#2ca02c"  # green
PRED_COLOR = "#ff3d7f"  # magenta-red
CURVE_COLUMNS = 4
CURVE_PANEL_INCHES = (3.6, 2.6)
OVERLAY_INCHES = (10.5, 6.6)
RENDER_INCHES = (10.0, 4.8)
RECTIFY_INCHES = (12.0, 6.2)
#: Argmax colours of foreground classes 1, 2, 3, ... in the rectification figure (RGB in [0, 1]).
ARGMAX_CLASS_COLORS = ((1.0, 1.0, 1.0), (0.0, 0.9, 1.0), (0.6, 0.4, 1.0), (0.3, 0.85, 0.3))
MAX_RENDER_GRID = 64  # marching cubes on at most ~64 samples per axis (step_size), to keep renders fast


@dataclass(frozen=True)
class SavedFigure:
    """A PNG written by :func:`save_figure`: its path and pixel size."""

    path: Path
    width: int
    height: int


def subplots(*grid: int, figsize: tuple[float, float], layout: str | None = "constrained", **kwargs: Any) -> Any:
    """``(figure, axes)`` as ``pyplot.subplots`` gives them, on a figure that pyplot never sees: it neither
    switches the user's backend nor joins their open figures, and it is freed with its last reference."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(fig: Figure, path: str | Path) -> SavedFigure:
    """Write ``fig`` as a PNG atomically at :data:`DPI`; returns its path and pixel size."""
    path = Path(path)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return SavedFigure(path, int(width), int(height))


def legend_if_labelled(ax: Axes, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` when something on ``ax`` is labelled: a panel whose series were not logged
    holds nothing, and an empty legend is a matplotlib warning on the command's output."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


# --- training curves -------------------------------------------------------------------------


def point_marker(n_points: int) -> str | None:
    """The marker of a logged series: a dot when it has one point (a run reported early), since a line
    through one point draws nothing; none otherwise."""
    return "o" if n_points == 1 else None


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [
        (r["step"], r[key])
        for r in records
        if key in r and "step" in r and isinstance(r[key], (int, float)) and r[key] is not None
    ]
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(pts, dtype=float)
    return arr[:, 0], arr[:, 1]


def curve_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]], dict[str, Any]]]:
    """The panels that :func:`plot_training_curves` draws for these log records.

    Returns ``[(title, [(key, label), ...], options), ...]``, only for keys that occur in the log.
    """
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    present = set(keys)
    panels: list[tuple[str, list[tuple[str, str]], dict[str, Any]]] = []
    for key in keys:
        if key == "loss" or key.startswith("loss_"):
            title = "total loss" if key == "loss" else f"loss term: {key[5:]}"
            panels.append((title, [(key, key)], {"log": True}))
    if "lr" in present:
        panels.append(("learning rate", [("lr", "lr")], {}))
    if "mu" in present:
        panels.append(("μ (rectification weight)", [("mu", "μ")], {}))
    reliability = [
        (k, label)
        for k, label in (
            ("reliable_before", "before rectification"),
            ("reliable_after", "after rectification"),
            ("reliable_fraction", "in ℓu (strong view)"),
        )
        if k in present
    ]
    if reliability:
        panels.append(("reliable pseudo-label fraction (conf ≥ τ)", reliability, {"unit": True}))
    for scope in ("all", "reliable"):
        pair = [(f"dice_{scope}_{when}", f"{when} rectification") for when in ("before", "after")]
        pair = [p for p in pair if p[0] in present]
        if pair:
            title = f"pseudo-label Dice ({'all voxels' if scope == 'all' else 'reliable voxels'})"
            panels.append((title, pair, {"unit": True}))
    if "val_dice" in present:
        panels.append(("validation Dice", [("val_dice", "val Dice")], {"unit": True, "markers": True}))
    return panels


def plot_training_curves(
    records: list[dict[str, Any]], path: str | Path, *, marks: Sequence[TimelineMark] = (), title: str = ""
) -> SavedFigure | None:
    """Small multiples of every scalar the run logged; None when the log has nothing to plot.

    Each of the method's ``marks`` (:meth:`crln.methods.Method.timeline_marks`, e.g. CRLN's S) draws a dashed
    vertical line on every panel.
    """
    panels = curve_panels(records)
    if not panels:
        return None
    cols = min(CURVE_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = subplots(
        rows,
        cols,
        figsize=(CURVE_PANEL_INCHES[0] * CURVE_COLUMNS, CURVE_PANEL_INCHES[1] * rows + 0.5),
        squeeze=False,
    )
    if title:
        fig.suptitle(title, fontsize=12)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        name, keys, opts = panels[index]
        for color, (key, label) in zip(colors, keys):
            x, y = _series(records, key)
            if not len(x):
                continue
            marker = "o" if opts.get("markers") else point_marker(x.size)
            ax.plot(x, y, color=color, label=label, lw=1.4, marker=marker, ms=4)
        if opts.get("log"):
            _, ys = _series(records, keys[0][0])
            if len(ys) and np.all(ys > 0) and ys.max() / max(ys.min(), 1e-12) > 20:
                ax.set_yscale("log")
        if opts.get("unit"):
            ax.set_ylim(-0.02, 1.02)
        for mark in marks:
            ax.axvline(mark.step, color="grey", ls="--", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            legend_if_labelled(ax, fontsize=7, loc="best")
    return save_figure(fig, path)


# --- slices ----------------------------------------------------------------------------------


def object_centre(*masks: np.ndarray | None, shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Centre (rounded centre of mass) of the first non-empty mask; the volume centre otherwise."""
    for mask in masks:
        if mask is not None and mask.any():
            coords = np.argwhere(mask)
            return tuple(round(float(v)) for v in coords.mean(axis=0))  # type: ignore[return-value]
    shape = shape or next(m.shape for m in masks if m is not None)
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """Three orthogonal slices through ``centre``, oriented for ``imshow(origin="lower")``."""
    x, y, z = centre
    return [
        (f"axial (z={z})", volume[:, :, z].T),
        (f"coronal (y={y})", volume[:, y, :].T),
        (f"sagittal (x={x})", volume[x, :, :].T),
    ]


def _plane_aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = (float(s) for s in spacing)
    # imshow aspect = height / width of one pixel; rows are the second axis of each slice's source.
    return [sy / sx, sz / sx, sz / sy]


def _contours(ax, mask2d: np.ndarray, num_classes: int, color: str, style: str = "-") -> None:
    """Outline each foreground class; a plane one voxel thin (a one-slice volume) has no outline to
    trace, so its voxels are shaded instead."""
    from matplotlib.colors import ListedColormap

    for c in range(1, max(num_classes, 2)):
        m = (mask2d == c).astype(float)
        if not m.any():
            continue
        if min(m.shape) < 2:
            aspect = ax.get_aspect()  # keep the plane's voxel aspect set by the image below
            ax.imshow(np.ma.masked_equal(m, 0), cmap=ListedColormap([color]), alpha=0.5, origin="lower")
            ax.set_aspect(aspect)
        else:
            ax.contour(m, levels=[0.5], colors=[color], linewidths=1.3, linestyles=style, origin="lower")


def plot_slice_overlay(
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    confidence: np.ndarray,
    path: str | Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    num_classes: int = 2,
    title: str = "",
) -> SavedFigure:
    """Row 1: image with ground-truth (green) and prediction (magenta) contours in three planes
    through the object's centre; row 2: the confidence (max softmax) map with the prediction contour."""
    centre = object_centre(label > 0 if label is not None else None, pred > 0, shape=image.shape)
    lo, hi = np.percentile(image, [1, 99.5])
    fig, axes = subplots(2, 3, figsize=OVERLAY_INCHES)
    if title:
        fig.suptitle(title, fontsize=12)
    aspects = _plane_aspects(spacing)
    images = _planes(image, centre)
    preds = _planes(pred, centre)
    labels = _planes(label, centre) if label is not None else [None] * 3
    confs = _planes(confidence, centre)
    conf_lo = 1.0 / max(num_classes, 2)
    mappable = None
    for col in range(3):
        name, img = images[col]
        ax = axes[0, col]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspects[col], interpolation="nearest")
        if labels[col] is not None:
            _contours(ax, labels[col][1], num_classes, GT_COLOR)
        _contours(ax, preds[col][1], num_classes, PRED_COLOR, "--")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
        ax = axes[1, col]
        mappable = ax.imshow(
            confs[col][1],
            cmap="magma",
            vmin=conf_lo,
            vmax=1.0,
            origin="lower",
            aspect=aspects[col],
            interpolation="nearest",
        )
        _contours(ax, preds[col][1], num_classes, "#00e5ff", "--")
        ax.set_title(f"confidence, {name.split(' ')[0]}", fontsize=10)
        ax.set_axis_off()
    fig.colorbar(mappable, ax=axes[1, :].tolist(), shrink=0.85, label="max softmax")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=PRED_COLOR, lw=2, ls="--", label="prediction")]
    if label is not None:  # name the ground truth only where one is drawn
        handles.insert(0, Line2D([], [], color=GT_COLOR, lw=2, label="ground truth"))
    axes[0, 2].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    return save_figure(fig, path)


# --- 3D surface render -----------------------------------------------------------------------


def _mesh(mask: np.ndarray, spacing: Sequence[float], step: int) -> tuple[np.ndarray, np.ndarray] | None:
    from skimage.measure import marching_cubes

    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float32), 1)  # closes surfaces that touch the volume's border
    try:
        verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=tuple(spacing), step_size=step)
    except (ValueError, RuntimeError):
        return None
    verts -= np.asarray(spacing, dtype=float)  # undo the padding offset
    return verts, faces


def _shade(verts: np.ndarray, faces: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.array([0.4, -0.5, 0.75])
    light /= np.linalg.norm(light)
    intensity = 0.35 + 0.65 * np.abs(normals @ light)
    out = rgba.copy()
    out[:, :3] *= intensity[:, None]
    return out


def render_step(shape: Sequence[int]) -> int:
    """Marching-cubes step size that keeps at most about :data:`MAX_RENDER_GRID` samples per axis."""
    return max(1, math.ceil(max(shape) / MAX_RENDER_GRID))


def plot_surface_render(
    label: np.ndarray | None,
    pred: np.ndarray,
    path: str | Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    distance_unit: str = "voxels",
    title: str = "",
) -> SavedFigure:
    """Ground-truth surface (left) and prediction surface coloured by its distance to the
    ground-truth surface (right), marching cubes with a capped mesh size, same view for both."""
    from matplotlib import colors
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from scipy import ndimage

    gt_mask = label > 0 if label is not None else None
    pred_mask = pred > 0
    fig = Figure(figsize=RENDER_INCHES)
    if title:
        fig.suptitle(title, fontsize=12)
    sp = np.asarray(spacing, dtype=float)
    union = pred_mask | gt_mask if gt_mask is not None else pred_mask
    if union.any():
        coords = np.argwhere(union)
        margin = 3
        low = np.maximum(coords.min(axis=0) - margin, 0) * sp
        high = (np.minimum(coords.max(axis=0) + margin, np.asarray(pred.shape) - 1) + 1) * sp
    else:
        low, high = np.zeros(3), np.asarray(pred.shape, dtype=float) * sp
    extent = high - low
    step = render_step(np.rint(extent / sp).astype(int))  # cap the mesh on the object's box
    dist = None
    if gt_mask is not None and gt_mask.any():
        sampling = tuple(float(s) for s in spacing)
        # signed distance (outside > 0), interpolated at mesh points: |value| ~ distance to the GT surface
        dist = ndimage.distance_transform_edt(~gt_mask, sampling=sampling) - ndimage.distance_transform_edt(
            gt_mask, sampling=sampling
        )
    vmax = 1.0
    norm = None
    panels = [("ground truth", gt_mask), ("prediction (colour: distance to GT surface)", pred_mask)]
    for index, (name, mask) in enumerate(panels):
        ax = fig.add_subplot(1, 2, index + 1, projection="3d")
        ax.set_title(name, fontsize=10)
        mesh = _mesh(mask, spacing, step) if mask is not None else None
        if mesh is None:
            ax.text2D(0.5, 0.5, "empty" if mask is not None else "no ground truth", ha="center", transform=ax.transAxes)
        else:
            verts, faces = mesh
            if index == 1 and dist is not None:
                centroids = verts[faces].mean(axis=1) / np.asarray(spacing, dtype=float)
                signed = ndimage.map_coordinates(dist, centroids.T, order=1, mode="nearest")
                values = np.maximum(np.abs(signed) - 0.5 * float(min(spacing)), 0.0)
                vmax = max(float(np.percentile(values, 99)), 1.0)
                norm = colors.Normalize(0.0, vmax)
                rgba = matplotlib.colormaps["turbo"](norm(values))
            else:
                rgba = np.tile(colors.to_rgba(GT_COLOR if index == 0 else PRED_COLOR), (len(faces), 1))
            collection = Poly3DCollection(verts[faces], facecolors=_shade(verts, faces, np.asarray(rgba)), linewidths=0)
            ax.add_collection3d(collection)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_zlim(low[2], high[2])
        ax.set_box_aspect(tuple(extent))
        ax.view_init(elev=25, azim=-60)
        ax.set_axis_off()
    if norm is not None:
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap="turbo")
        fig.colorbar(mappable, ax=fig.axes, shrink=0.6, label=f"distance to GT surface ({distance_unit})")
    return save_figure(fig, path)


# --- CRLN rectification (Fig. 8) -------------------------------------------------------------


def plot_rectification(
    image: np.ndarray,
    label: np.ndarray | None,
    teacher: np.ndarray,
    m_probs: np.ndarray,
    rectified: np.ndarray,
    path: str | Path,
    *,
    threshold: float,
    title: str = "",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> SavedFigure:
    """One axial slice of a patch: image + GT, then for the teacher pseudo-label ȳ, the DIM's M(x)
    and the rectified ȳ_r: foreground probability (row 1) and argmax with the reliable voxels
    (confidence ≥ τ) highlighted (row 2). Inputs are ``(C, H, W, D)`` probabilities."""
    z = object_centre(label > 0 if label is not None else None, teacher.argmax(0) > 0, shape=image.shape)[2]
    aspect = float(spacing[1]) / float(spacing[0])
    lo, hi = np.percentile(image, [1, 99.5])
    fig, axes = subplots(2, 4, figsize=RECTIFY_INCHES)
    if title:
        fig.suptitle(title, fontsize=12)

    def show_image(ax, heading: str) -> None:
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
        if label is not None:
            _contours(ax, label[:, :, z].T, teacher.shape[0], GT_COLOR)
        ax.set_title(heading, fontsize=10)
        ax.set_axis_off()

    show_image(axes[0, 0], f"image + ground truth (z={z})")
    show_image(axes[1, 0], "image")
    mappable = None
    for col, (name, probs) in enumerate(
        [("teacher pseudo-label ȳ", teacher), ("M(x) (DIM)", m_probs), ("rectified ȳ_r", rectified)], start=1
    ):
        fg = 1.0 - probs[0]
        mappable = axes[0, col].imshow(fg[:, :, z].T, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect=aspect)
        if label is not None:
            _contours(axes[0, col], label[:, :, z].T, probs.shape[0], "white")
        axes[0, col].set_title(f"{name}: P(foreground)", fontsize=10)
        axes[0, col].set_axis_off()
        conf, arg = probs.max(0), probs.argmax(0)
        reliable = conf >= threshold
        rgb = np.zeros((*arg.shape, 3), dtype=float)
        for cls in range(1, probs.shape[0]):  # reliable foreground: white for class 1, then one colour per class
            rgb[arg == cls] = ARGMAX_CLASS_COLORS[(cls - 1) % len(ARGMAX_CLASS_COLORS)]
        rgb[arg == 0] = (0.25, 0.25, 0.25)  # reliable background: dark grey
        rgb[~reliable] = (0.96, 0.62, 0.04)  # unreliable: orange
        axes[1, col].imshow(rgb[:, :, z].transpose(1, 0, 2), origin="lower", aspect=aspect, interpolation="nearest")
        axes[1, col].set_title(f"argmax, orange: conf < τ ({100 * reliable.mean():.0f}% reliable)", fontsize=9)
        axes[1, col].set_axis_off()
    fig.colorbar(mappable, ax=axes[0, :].tolist(), shrink=0.85, label="P(foreground)")
    return save_figure(fig, path)
