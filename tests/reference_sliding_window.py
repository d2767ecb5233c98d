"""Reference: the field's one-window-at-a-time sliding-window loop (UA-MT / MC-Net ``test_single_case``).

A plain, readable rewrite of the protocol that :func:`crln.inference.sliding_window_predict`
reproduces with MONAI: pad each axis smaller than the patch with zeros (half before, the rest
after), visit the windows starting at ``min(stride * i, size - patch)`` for
``i in range(ceil((size - patch) / stride) + 1)``, add each window's softmax and a count of 1,
divide by the count, crop the padding. Kept here as the oracle of the tests and of benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["reference_sliding_window", "window_starts"]


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window start positions along one (already padded, ``size >= patch``) axis."""
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def reference_sliding_window(
    model: Callable[[Tensor], Tensor],
    image: np.ndarray,
    patch_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
) -> tuple[np.ndarray, int]:
    """Averaged softmax of ``image`` by the field's loop.

    Args:
        model: maps a ``(1, 1, h, w, d)`` float32 window to logits ``(1, num_classes, h, w, d)``.
        image: ``(H, W, D)`` volume.
        patch_size: window size ``(h, w, d)``.
        stride: step per axis.
        num_classes: output channels.

    Returns:
        ``((num_classes, H, W, D)`` float32 probabilities, number of windows evaluated).
    """
    original = image.shape
    pads = []
    for size, patch in zip(original, patch_size):
        missing = max(patch - size, 0)
        pads.append((missing // 2, missing - missing // 2))
    padded = np.pad(image.astype(np.float32), pads, mode="constant", constant_values=0)

    scores = np.zeros((num_classes, *padded.shape), dtype=np.float32)
    counts = np.zeros(padded.shape, dtype=np.float32)
    px, py, pz = patch_size
    windows = 0
    with torch.no_grad():
        for xs in window_starts(padded.shape[0], px, stride[0]):
            for ys in window_starts(padded.shape[1], py, stride[1]):
                for zs in window_starts(padded.shape[2], pz, stride[2]):
                    window = padded[xs : xs + px, ys : ys + py, zs : zs + pz]
                    logits = model(torch.from_numpy(np.ascontiguousarray(window))[None, None])
                    probs = torch.softmax(logits, dim=1)[0].numpy()
                    scores[:, xs : xs + px, ys : ys + py, zs : zs + pz] += probs
                    counts[xs : xs + px, ys : ys + py, zs : zs + pz] += 1
                    windows += 1
    scores /= counts[None]

    crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, original))
    return scores[(slice(None), *crop)], windows
