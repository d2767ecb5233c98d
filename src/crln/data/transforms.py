"""Numpy patch transforms driven by an explicit ``np.random.Generator``.

Images are ``(H, W, D)`` or channel-first ``(C, H, W, D)``; labels are ``(H, W, D)`` or ``None``.
The spatial axes are always the last three, so one code path serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crln.config import INTENSITY_MODES  # configs check the modes before torch loads

__all__ = [
    "INTENSITY_MODES",
    "AugmentConfig",
    "gaussian_noise",
    "normalize_intensity",
    "pad_to_size",
    "random_brightness",
    "random_crop",
    "random_rot_flip",
    "zscore_channels",
]


@dataclass
class AugmentConfig:
    """Training augmentation: the field's RandomRotFlip and clipped Gaussian noise.

    Attributes:
        rot_flip: rot90 by k in {0..3} in the H-W plane, then a flip along H or W.
        noise_sigma: std of additive Gaussian noise (0 disables).
        noise_clip: noise is clipped to ``[-noise_clip, noise_clip]``.
        brightness: ``(low, high)``: multiply by ``U(low, high)`` and clip to [0, 1] (``(1, 1)``: off).
    """

    rot_flip: bool = True
    brightness: tuple[float, float] = (1.0, 1.0)
    noise_sigma: float = 0.0
    noise_clip: float = 0.2


def _spatial(image: np.ndarray) -> tuple[int, int, int]:
    return tuple(image.shape[-3:])  # type: ignore[return-value]


def pad_to_size(
    image: np.ndarray,
    label: np.ndarray | None,
    size: Sequence[int],
    mode: str = "constant",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad symmetrically so every spatial axis is at least ``size`` (``(h, w, d)``); larger axes stay.

    The image uses ``mode`` (``np.pad`` modes, constant = 0); the label is padded with 0 (background).
    """
    shape = _spatial(image)
    pads = []
    for n, s in zip(shape, size, strict=True):
        extra = max(int(s) - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return image, label
    lead = [(0, 0)] * (image.ndim - 3)
    image = np.pad(image, lead + pads, mode=mode)  # type: ignore[call-overload]
    if label is not None:
        label = np.pad(label, pads, mode="constant")
    return image, label


def random_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    size: Sequence[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop a random ``size`` patch (padding first when the volume is smaller). Returns views."""
    image, label = pad_to_size(image, label, size)
    starts = [int(rng.integers(0, n - int(s) + 1)) for n, s in zip(_spatial(image), size, strict=True)]
    sl = tuple(slice(a, a + int(s)) for a, s in zip(starts, size, strict=True))
    image = image[(..., *sl)]
    if label is not None:
        label = label[sl]
    return image, label


def random_rot_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """rot90 by k in {0..3} in the H-W plane, then flip along H or W (the field's RandomRotFlip).

    Like the field's, it always flips, so it yields the 4 reflections of the H-W square (each
    twice over the 8 (k, axis) draws), never a pure rotation. Odd k swaps H and W: apply it before
    cropping (as the field does) when patches are not square. Returns views.
    """
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k, axes=(-3, -2)), axis=axis - 3)
    if label is not None:
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return image, label


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float, clip: float) -> np.ndarray:
    """Add noise ``clip(N(0, sigma), -clip, clip)`` voxel-wise; returns float32 (with ``sigma <= 0`` the
    input itself when it is float32 already, so copy before writing into it)."""
    if sigma <= 0:
        return np.asarray(image, dtype=np.float32)
    noise = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    np.clip(noise, -clip, clip, out=noise)
    return (image + noise).astype(np.float32, copy=False)


def random_brightness(image: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Multiply by ``U(low, high)`` and clip to [0, 1] (the authors' RandomBrightness, for min-max data)."""
    if low == high == 1.0:
        return image
    return np.clip(image * np.float32(rng.uniform(low, high)), 0.0, 1.0).astype(np.float32, copy=False)


def normalize_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Whole-volume intensity normalisation: ``"as_stored"`` returns ``image``; ``"minmax"`` scales each
    channel of ``(H, W, D)`` / ``(C, H, W, D)`` to [0, 1] (a constant channel becomes 0); ``"zscore"`` gives
    each channel mean 0 and std 1 (:func:`zscore_channels`)."""
    if mode == "as_stored":
        return image
    if mode == "zscore":
        return zscore_channels(image)
    if mode != "minmax":
        raise ValueError(f"intensity mode must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}")
    volume = image.astype(np.float32, copy=True)
    channels = volume.reshape(-1, *volume.shape[-3:]) if volume.ndim == 4 else volume[None]
    for channel in channels:
        low, high = float(channel.min()), float(channel.max())
        channel -= low
        if high > low:
            channel /= high - low
    return volume


def zscore_channels(image: np.ndarray) -> np.ndarray:
    """Z-score each channel over all its voxels (nnU-Net's default for non-CT data); float32.

    ``image`` is ``(H, W, D)`` (one channel) or ``(C, H, W, D)``. A constant channel becomes zeros:
    nothing divides by a zero standard deviation.
    """
    channels = image[None] if image.ndim == 3 else image
    out = np.empty(channels.shape, dtype=np.float32)
    for c, channel in enumerate(channels):
        mean, std = float(channel.mean(dtype=np.float64)), float(channel.std(dtype=np.float64))
        out[c] = (channel - mean) / std if std > 0 else channel - mean
    return out[0] if image.ndim == 3 else out
