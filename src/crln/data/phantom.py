"""Seeded synthetic phantoms: an organ-like blob in a textured background, written as h5 or nnU-Net data.

Used by tests, smoke runs and benchmarks where the real datasets are absent. The target is learnable
by a small 3D CNN yet not trivial: moderate contrast, varying size and pose, a smooth bias field,
noise, partial-volume edges and unlabelled distractor blobs of similar intensity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from crln.atomic import atomic_write_text
from crln.data.case import Case
from crln.data.h5 import write_h5_case
from crln.data.nifti import write_nifti
from crln.errors import CrlnError

__all__ = [
    "NARROW",
    "WIDE",
    "PhantomStyle",
    "make_phantom",
    "write_phantom_h5_dataset",
    "write_phantom_nifti_dataset",
]


@dataclass(frozen=True)
class PhantomStyle:
    """Ranges the per-case appearance and anatomy are drawn from (uniformly, per case).

    Sizes are fractions of the volume's shortest side; intensities are before z-scoring.
    """

    warp: tuple[float, float] = (0.03, 0.07)  # amplitude of the smooth deformation (how organ-like)
    organ_radius: tuple[float, float] = (0.16, 0.3)
    edge: tuple[float, float] = (0.06, 0.12)  # partial-volume edge width
    contrast: tuple[float, float] = (0.9, 1.4)  # organ brightness over the background
    distractors: tuple[int, int] = (1, 4)  # number of unlabelled blobs, [low, high)
    distractor_brightness: tuple[float, float] = (0.5, 0.9)  # as a fraction of the organ's contrast
    bias: float = 0.35  # largest slope of the log bias field
    noise: tuple[float, float] = (0.2, 0.35)  # std of the voxel noise


# The default style, and a pair for a labelled set that misses part of the population: NARROW is one
# scanner's typical case (mid-sized organ, good contrast, little noise and bias); WIDE spans the
# whole population, NARROW included (small to large organs, more deformation, low to high contrast,
# up to twice the noise, strong bias fields, more distractors).
DEFAULT = PhantomStyle()
NARROW = PhantomStyle(
    warp=(0.03, 0.05), organ_radius=(0.2, 0.24), contrast=(1.3, 1.5), distractors=(1, 2), bias=0.1, noise=(0.15, 0.2)
)
WIDE = PhantomStyle(
    warp=(0.03, 0.1), organ_radius=(0.12, 0.34), contrast=(0.5, 1.5), distractors=(1, 6), bias=0.6, noise=(0.15, 0.45)
)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: int) -> np.ndarray:
    """Low-frequency noise: random values on a coarse grid, upsampled linearly (fast, vectorised)."""
    coarse = rng.normal(size=tuple(max(2, s // cell + 2) for s in shape)).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse.shape, strict=True)]
    out = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1], : shape[2]]


def _ellipsoid_level(grid: Sequence[np.ndarray], center: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Signed distance-like level ``1 - |R (x - c) / r|``: positive inside, ~0 on the surface."""
    d = [g - c for g, c in zip(grid, center, strict=True)]
    r2 = np.zeros(d[0].shape, dtype=np.float32)
    for i in range(3):
        u = rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2]
        r2 += (u / radii[i]) ** 2
    return 1.0 - np.sqrt(r2)


def _soft(level: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy in [0, 1]: a sigmoid of the level over an edge width."""
    return (1.0 / (1.0 + np.exp(-np.clip(level / edge, -30.0, 30.0)))).astype(np.float32)


def make_phantom(
    seed: int, shape: Sequence[int] = (96, 96, 64), num_classes: int = 2, style: PhantomStyle = DEFAULT
) -> Case:
    """One seeded phantom.

    Args:
        seed: same seed, same volume (bit for bit).
        shape: ``(H, W, D)``.
        num_classes: classes including background; foreground classes ``1..C-1`` are all present
            (class 1 the organ, classes >= 2 smaller inclusions inside it).
        style: the ranges of anatomy and appearance the case is drawn from.

    Returns:
        A :class:`Case` with image ``(H, W, D)`` float32 (z-scored) and label ``(H, W, D)`` uint8.
    """
    if not 2 <= num_classes <= 256:  # the label is uint8: classes 0..255
        raise CrlnError(f"num_classes = {num_classes}, expected 2 to 256 for a phantom")
    shape3 = tuple(int(s) for s in shape)
    if len(shape3) != 3 or min(shape3) < 8:
        raise CrlnError(f"phantom shape {tuple(shape)}, expected 3 axes of at least 8 voxels")
    rng = np.random.default_rng(seed)
    # physical coords in voxels, centred; a smooth deformation makes the blob organ-like, not ellipsoidal
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in shape3], indexing="ij", sparse=True)
    grid = [np.broadcast_to(g, shape3) for g in grid]
    scale = float(min(shape3))
    warp_amp = scale * rng.uniform(*style.warp)
    warped = [g + warp_amp * _smooth_noise(rng, shape3, cell=max(4, int(scale // 4))) for g in grid]

    organ_r = scale * rng.uniform(*style.organ_radius) * rng.uniform(0.75, 1.25, size=3)
    organ_r = np.minimum(organ_r, np.array(shape3) * 0.4)
    margin = np.array(shape3) / 2 - organ_r - 2
    center = rng.uniform(-1, 1, size=3) * np.maximum(margin, 0) * 0.8
    rot = _rotation(rng)
    levels = [_ellipsoid_level(warped, center, organ_r, rot)]
    for _ in range(2, num_classes):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        sub_c = center + rot.T @ (direction * organ_r * 0.45)
        sub_r = organ_r * rng.uniform(0.25, 0.35)
        levels.append(_ellipsoid_level(warped, sub_c, sub_r, rot))
    label = np.zeros(shape3, dtype=np.uint8)
    for cls, lev in enumerate(levels, 1):
        label[lev > 0] = cls
    # guarantee every class is present (tiny shapes may lose an inclusion to rounding)
    for cls, lev in enumerate(levels, 1):
        if not (label == cls).any():
            label[np.unravel_index(int(np.argmax(lev)), shape3)] = cls

    # intensities: soft (partial-volume) masks so edges are blurred, not step functions
    edge = rng.uniform(*style.edge)
    contrast = rng.uniform(*style.contrast)
    image = 0.45 * _smooth_noise(rng, shape3, cell=6) + 0.25 * _smooth_noise(rng, shape3, cell=3)
    image += contrast * _soft(levels[0], edge)
    for lev in levels[1:]:
        image += rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 0.9) * _soft(lev, edge)
    # distractors: smaller unlabelled blobs of similar brightness, so intensity alone is not enough
    for _ in range(int(rng.integers(*style.distractors))):
        r = scale * rng.uniform(0.05, 0.1) * rng.uniform(0.7, 1.3, size=3)
        c = rng.uniform(-0.45, 0.45, size=3) * np.array(shape3)
        lev = _ellipsoid_level(grid, c, r, _rotation(rng))
        image += contrast * rng.uniform(*style.distractor_brightness) * _soft(lev, edge) * (label == 0)
    image = ndimage.gaussian_filter(image.astype(np.float32), sigma=0.8)
    # smooth multiplicative bias field, then noise
    coords = [g / scale for g in grid]
    log_bias = (
        sum(rng.uniform(-style.bias, style.bias) * c for c in coords) + rng.uniform(-0.3, 0.3) * coords[0] * coords[1]
    )
    image = image * np.exp(log_bias).astype(np.float32)
    image += rng.normal(0.0, rng.uniform(*style.noise), size=shape3).astype(np.float32)
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    return Case(
        case_id=f"phantom_{seed}",
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=label,
        source=f"phantom(seed={seed})",
    )


def _case_seeds(seed: int, n: int) -> list[int]:
    # distinct, reproducible per-case seeds
    return [int(s) for s in np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)]


def _styles(n_cases: int, narrow_first: int) -> list[PhantomStyle]:
    """Every case DEFAULT, or (``narrow_first`` > 0) the first cases NARROW and all others WIDE."""
    if narrow_first <= 0:
        return [DEFAULT] * n_cases
    return [NARROW if i < narrow_first else WIDE for i in range(n_cases)]


def _cases(n: int, shape: Sequence[int], seed: int, num_classes: int, narrow_first: int) -> Iterator[Case]:
    """The ``n`` cases of a dataset, in list order (one home for the per-case seeds and styles)."""
    for s, style in zip(_case_seeds(seed, n), _styles(n, narrow_first), strict=True):
        yield make_phantom(s, shape, num_classes, style)


def _ids(n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    if n_train < 1 or n_test < 0:
        raise CrlnError(f"n_train = {n_train}, n_test = {n_test}, expected n_train >= 1 and n_test >= 0")
    return [f"case_{i:03d}" for i in range(n_train)], [f"case_{i:03d}" for i in range(n_train, n_train + n_test)]


def write_phantom_h5_dataset(
    root: str | Path,
    *,
    n_train: int = 12,
    n_test: int = 4,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    num_classes: int = 2,
    narrow_first: int = 0,
) -> Path:
    """Write an h5 phantom dataset: ``<root>/data/<id>.h5`` plus ``train.list`` and ``test.list``.

    ``narrow_first`` > 0 makes a labelled set that misses part of the population: the first that many
    training cases (the labelled ones under ``data.labeled`` = that number) are drawn from
    :data:`NARROW`, the other training cases and every test case from :data:`WIDE`.
    """
    root = Path(root)
    train, test = _ids(n_train, n_test)
    for cid, case in zip(
        train + test, _cases(len(train) + len(test), shape, seed, num_classes, narrow_first), strict=True
    ):
        write_h5_case(root / "data" / f"{cid}.h5", case.image, case.label)
    atomic_write_text(root / "train.list", "".join(f"{c}\n" for c in train))
    atomic_write_text(root / "test.list", "".join(f"{c}\n" for c in test))
    return root


def write_phantom_nifti_dataset(
    root: str | Path,
    *,
    n_train: int = 12,
    n_test: int = 4,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    num_classes: int = 2,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    channels: int = 1,
    n_unlabeled: int = 0,
    narrow_first: int = 0,
) -> Path:
    """Write an nnU-Net v2 style phantom folder: ``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs``,
    ``dataset.json``.

    Args:
        channels: image files per case (``<id>_0000``, ``<id>_0001``, ...); channel k is the phantom
            with its contrast inverted for odd k and offset by k, so the channels differ.
        n_unlabeled: the last ``n_unlabeled`` training cases get no file in ``labelsTr/`` (truly
            unlabelled images).
        narrow_first: as in :func:`write_phantom_h5_dataset`.
    """
    root = Path(root)
    train, test = _ids(n_train, n_test)
    if channels < 1 or not 0 <= n_unlabeled < n_train:
        raise CrlnError(f"channels = {channels}, n_unlabeled = {n_unlabeled}, expected >= 1 and in [0, n_train)")
    affine = np.diag([*map(float, spacing), 1.0])
    cases = _cases(len(train) + len(test), shape, seed, num_classes, narrow_first)
    for i, (cid, case) in enumerate(zip(train + test, cases, strict=True)):
        img_dir, lab_dir = ("imagesTr", "labelsTr") if i < len(train) else ("imagesTs", "labelsTs")
        for k in range(channels):
            write_nifti(root / img_dir / f"{cid}_{k:04d}.nii.gz", (-1) ** k * case.image + k, affine)
        if not len(train) - n_unlabeled <= i < len(train):
            write_nifti(root / lab_dir / f"{cid}.nii.gz", case.label, affine)
    labels = {"background": 0, "organ": 1} | {f"inclusion_{k}": k for k in range(2, num_classes)}
    meta = {
        "name": "crln_phantom",
        "channel_names": {str(k): f"phantom_{k}" if k else "phantom" for k in range(channels)},
        "labels": labels,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return root
