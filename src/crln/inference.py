"""Sliding-window inference with the field's evaluation protocol.

The field (UA-MT / MC-Net ``test_single_case``) predicts a volume as follows, per axis of size
``size`` with patch ``patch`` and stride ``stride``:

1. if ``size < patch``, pad with zeros to ``patch``: ``(patch - size) // 2`` before, the rest after;
2. tile with starts ``min(stride * i, size - patch)`` for ``i in range(ceil((size - patch) / stride) + 1)``
   (``size`` after padding);
3. softmax each tile's logits, add the tiles' probabilities and divide by the count map;
4. crop the padding off.

:func:`sliding_window_predict` runs exactly these steps, in the field's window order (x outer, z
inner), with batches of ``sw_batch_size`` windows per forward pass. The count map is never stored:
the windows form a grid, so the number covering voxel ``(x, y, z)`` is ``n_x(x) * n_y(y) * n_z(z)``,
the product of the per-axis window counts, and the sum is divided by it one x-row at a time. Only the
``(C, H, W, D)`` float32 sum, one batch of windows and the network's activations are ever held. It
replaced MONAI's ``sliding_window_inference``, which stores a float32 count map as large as the volume
and spends more time per window (``benchmarks/RESULTS.md``). The field's default strides are
``(18, 18, 4)`` on LA and ``(16, 16, 16)`` elsewhere (config values).

:func:`optimize_for_inference` makes a network faster for this on CPU (BatchNorm folded,
``channels_last_3d``), and :func:`predict_case` takes the argmax into a uint8 map in row blocks, so
that no int64 map of the whole volume is ever made.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

from crln.errors import CrlnError
from crln.metrics import keep_largest_component

__all__ = [
    "entropy_map",
    "optimize_for_inference",
    "predict_case",
    "scaled_stride",
    "sliding_window_predict",
    "window_count",
    "window_starts",
]

#: Rows (first spatial axis) per block when dividing by the window count and taking the argmax:
#: bounds the temporaries to a few rows of the volume.
_ROWS_PER_BLOCK = 16


def _triple(name: str, value: Sequence[int] | int) -> tuple[int, int, int]:
    """``value`` as three positive ints (one per spatial axis)."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise CrlnError(f"sliding window: {name} is {value!r}, expected 3 positive integers")
    return int(values[0]), int(values[1]), int(values[2])


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """The field's window starts along one axis of ``size >= patch`` voxels (after padding).

    Args:
        size: axis length, at least ``patch``.
        patch: window length.
        stride: step, ``1 <= stride <= patch``.

    Returns:
        ``[min(stride * i, size - patch) for i in range(ceil((size - patch) / stride) + 1)]``.
    """
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def window_count(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> int:
    """Windows :func:`sliding_window_predict` runs on a volume of spatial ``shape`` (after the padding)."""
    return math.prod(len(window_starts(max(n, p), p, s)) for n, p, s in zip(shape, patch, stride))


def scaled_stride(stride: Sequence[int], patch: Sequence[int], ratio: float) -> tuple[int, int, int]:
    """A stride meant for data at one scale, for data ``ratio`` times finer (2 = twice the voxels per axis).

    Each axis is ``round(stride * ratio)``, kept between 1 and the patch: the windows then overlap by
    the same physical distance as the configured stride meant (e.g. LA's 9x9x2 at 0.5 scale is 18x18x4
    at full resolution, the field's LA stride).
    """
    return tuple(min(int(p), max(1, round(s * ratio))) for s, p in zip(stride, patch))  # type: ignore[return-value]


def _fold_batchnorm(sequence: nn.Sequential) -> int:
    """Fold each eval-mode BatchNorm that directly follows a convolution in ``sequence`` into it.

    The pair is replaced, in place, by the folded convolution and an ``Identity``; returns the number folded.
    """
    folded = 0
    for index in range(len(sequence) - 1):
        conv, norm = sequence[index], sequence[index + 1]
        if not (isinstance(conv, _ConvNd) and isinstance(norm, _BatchNorm)) or norm.running_mean is None:
            continue  # not a conv-BN pair, or BN without running statistics (it normalises by the batch)
        transpose = isinstance(conv, _ConvTransposeNd)
        if transpose and conv.groups != 1:
            continue  # fuse_conv_bn_eval scales a transposed weight per output channel only for groups == 1
        sequence[index] = fuse_conv_bn_eval(conv, norm, transpose=transpose)
        sequence[index + 1] = nn.Identity()
        folded += 1
    return folded


def optimize_for_inference(network: nn.Module, device: torch.device | str) -> nn.Module:
    """A forward-only copy of an eval-mode network, made faster for sliding-window inference on ``device``.

    On CPU (measured in ``benchmarks/bench_inference.py``, see ``benchmarks/RESULTS.md``): every
    BatchNorm that directly follows a convolution inside an ``nn.Sequential`` is folded into that
    convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), which removes a full
    pass over each feature map, and the weights are put in ``channels_last_3d``, the layout in which
    oneDNN's 3D convolutions run fastest (their outputs follow the weights' layout). The logits equal
    the original network's up to float rounding (about 1e-6). Other devices get ``network`` itself:
    their memory format and precision are set by :class:`crln.engine.device.Performance`, and these
    changes are only measured on CPU.

    The copy shares nothing with ``network``, so training it or loading weights into it is
    meaningless; make a new copy after the weights change.

    Args:
        network: a module in eval mode mapping ``(B, C_in, h, w, d)`` windows to ``(B, C, h, w, d)`` logits.
        device: where the returned network will run (it must already be there).

    Returns:
        The optimised copy on CPU, else ``network`` unchanged.

    Raises:
        ValueError: ``network`` is in training mode (BatchNorm would then use batch statistics).
    """
    if network.training:
        raise ValueError("optimize_for_inference: the network is in training mode; call .eval() first")
    if torch.device(device).type != "cpu":
        return network
    optimized = copy.deepcopy(network)
    for module in list(optimized.modules()):
        if isinstance(module, nn.Sequential):
            _fold_batchnorm(module)
    return optimized.to(memory_format=torch.channels_last_3d)


def _resolve_device(model: Callable[[Tensor], Tensor], device: torch.device | str | None) -> torch.device:
    """``device``, else the device of the model's first parameter, else CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def sliding_window_predict(
    model: Callable[[Tensor], Tensor],
    image: np.ndarray | Tensor,
    *,
    patch_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    sw_batch_size: int = 4,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    output_device: torch.device | str | None = None,
) -> Tensor:
    """Softmax probabilities of a whole volume by overlapping windows (the field's protocol).

    The model is called as is (put it in eval mode first, or pass :func:`optimize_for_inference`'s
    copy) under ``torch.inference_mode()``, on batches of up to ``sw_batch_size`` windows moved to
    ``device``; each window's logits are turned into float32 softmax probabilities before averaging.
    The averaged volume lives on ``output_device``; besides it and the input, memory holds only one
    batch of windows (on ``device``) and the model's activations.

    Args:
        model: maps ``(B, C_in, h, w, d)`` windows to logits ``(B, num_classes, h, w, d)``.
        image: ``(H, W, D)`` or ``(C_in, H, W, D)`` volume (D = slice axis).
        patch_size: window size ``(h, w, d)``.
        stride: window step per axis, ``1 <= stride <= patch``; e.g. ``(18, 18, 4)`` on LA.
        num_classes: number of output channels the model must produce.
        sw_batch_size: windows per forward pass.
        device: where the model runs; default the model's parameters' device (CPU for a plain callable).
        amp_dtype: if given, run the model under ``torch.autocast(device.type, dtype=amp_dtype)``.
        output_device: where the result is accumulated and returned; default CPU.

    Returns:
        ``(num_classes, H, W, D)`` float32 averaged softmax probabilities on ``output_device``.

    Raises:
        CrlnError: bad image rank, patch, stride or batch size, or the model's channel count is
            not ``num_classes``.
        TypeError: the model returns something other than a Tensor.
    """
    patch = _triple("patch_size", patch_size)
    step = _triple("stride", stride)
    if any(s > p for s, p in zip(step, patch)):
        raise CrlnError(f"sliding window: stride {step} must be between 1 and the patch {patch}")
    if sw_batch_size < 1:
        raise CrlnError(f"sliding window: sw_batch_size is {sw_batch_size}, expected at least 1")
    # A numpy volume stays numpy (read-only cache arrays included): only the windows are copied and cast.
    volume = image if isinstance(image, Tensor) else np.asarray(image)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise CrlnError(f"sliding window: image shape {tuple(volume.shape)}, expected (H, W, D) or (C, H, W, D)")
    compute_device = _resolve_device(model, device)
    out_device = torch.device(output_device) if output_device is not None else torch.device("cpu")
    spatial = tuple(int(n) for n in volume.shape[1:])
    pads = [(max(p - n, 0) // 2, max(p - n, 0) - max(p - n, 0) // 2) for n, p in zip(spatial, patch)]
    if any(before or after for before, after in pads):
        # The field's zero padding of the axes shorter than the patch.
        if isinstance(volume, Tensor):
            volume = F.pad(volume, [width for pair in reversed(pads) for width in pair])
        else:
            volume = np.pad(volume, [(0, 0), *pads])
    padded = tuple(int(n) for n in volume.shape[1:])
    starts = [window_starts(n, p, s) for n, p, s in zip(padded, patch, step)]
    corners = list(itertools.product(*starts))  # the field's order: x outer, z inner

    def predictor(windows: Tensor) -> Tensor:
        if amp_dtype is not None:
            with torch.autocast(compute_device.type, dtype=amp_dtype):
                logits = model(windows)
        else:
            logits = model(windows)
        if not isinstance(logits, Tensor):
            raise TypeError(f"sliding window: the model returned {type(logits).__name__}, expected a Tensor of logits")
        if logits.ndim != 5 or logits.shape[1] != num_classes or tuple(logits.shape[2:]) != tuple(windows.shape[2:]):
            raise CrlnError(
                f"sliding window: model output shape {tuple(logits.shape)}, expected "
                f"({windows.shape[0]}, {num_classes}, *{tuple(windows.shape[2:])}) (num_classes = {num_classes})"
            )
        # Softmax per window, in float32, before averaging (the field averages probabilities).
        return torch.softmax(logits.float(), dim=1)

    total = torch.zeros((num_classes, *padded), dtype=torch.float32, device=out_device)
    with torch.inference_mode():
        for first in range(0, len(corners), sw_batch_size):
            group = corners[first : first + sw_batch_size]
            probs = predictor(_gather_windows(volume, group, patch).to(compute_device)).to(out_device)
            for corner, window_probs in zip(group, probs):
                total[(slice(None), *_window(corner, patch))] += window_probs
        _divide_by_window_count(total, starts, patch)
    if padded == spatial:
        return total
    return total[(slice(None), *(slice(before, before + n) for (before, _), n in zip(pads, spatial)))].contiguous()


def _window(corner: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    """The spatial slices of the window starting at ``corner``."""
    return tuple(slice(start, start + size) for start, size in zip(corner, patch))


def _gather_windows(volume: np.ndarray | Tensor, corners: Sequence[Sequence[int]], patch: Sequence[int]) -> Tensor:
    """The windows at ``corners`` of a ``(C_in, H, W, D)`` volume as one ``(B, C_in, h, w, d)`` float32 batch."""
    pieces = [volume[(slice(None), *_window(corner, patch))] for corner in corners]
    if isinstance(volume, Tensor):
        return torch.stack(pieces).to(dtype=torch.float32)
    return torch.from_numpy(np.stack(pieces).astype(np.float32, copy=False))


def _divide_by_window_count(total: Tensor, starts: Sequence[Sequence[int]], patch: Sequence[int]) -> None:
    """Divide the ``(C, H, W, D)`` sum of window probabilities, in place, by the number of windows per voxel.

    The windows form a grid, so that number is ``n_x(x) * n_y(y) * n_z(z)`` (windows covering each
    coordinate along each axis); it is formed exactly in float32, a few rows at a time, and never
    stored for the whole volume.
    """
    per_axis = []
    for size, window, axis_starts in zip(total.shape[1:], patch, starts):
        count = torch.zeros(size, dtype=torch.float32, device=total.device)
        for start in axis_starts:
            count[start : start + window] += 1
        per_axis.append(count)
    count_x, count_yz = per_axis[0], per_axis[1][:, None] * per_axis[2][None, :]
    for row in range(0, total.shape[1], _ROWS_PER_BLOCK):
        block = slice(row, row + _ROWS_PER_BLOCK)
        total[:, block] /= count_x[block, None, None] * count_yz


def entropy_map(probs: Tensor | np.ndarray) -> Tensor:
    """Voxel-wise predictive entropy ``-Σ_c p_c log p_c`` (nats) of a probability volume.

    Args:
        probs: ``(C, H, W, D)`` class probabilities (summing to 1 over C).

    Returns:
        ``(H, W, D)`` float32 entropy on the input's device, in ``[0, log C]``; ``0 log 0`` counts as 0.
    """
    p = torch.as_tensor(probs).float()
    return -torch.special.xlogy(p, p).sum(dim=0)


def predict_case(
    model: Callable[[Tensor], Tensor],
    image: np.ndarray | Tensor,
    *,
    patch_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    sw_batch_size: int = 4,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    largest_component: bool = False,
) -> tuple[np.ndarray, Tensor]:
    """Label map and probabilities of one volume: :func:`sliding_window_predict`, argmax, optional LCC.

    Args:
        model: see :func:`sliding_window_predict`.
        image: ``(H, W, D)`` or ``(C_in, H, W, D)`` volume.
        patch_size: window size ``(h, w, d)``.
        stride: window step per axis.
        num_classes: number of classes including background (at most 256).
        sw_batch_size: windows per forward pass.
        device: where the model runs.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        largest_component: keep only the largest 26-connected component of each foreground class
            (removed voxels become background), the field's optional post-processing.

    Returns:
        ``(label_map, probs)``: ``(H, W, D)`` uint8 class indices (numpy) and the ``(C, H, W, D)``
        float32 CPU probabilities they were taken from (not changed by the post-processing).

    Raises:
        CrlnError: as :func:`sliding_window_predict`, or ``num_classes > 256``.
    """
    if num_classes > 256:
        raise CrlnError(f"predict: num_classes is {num_classes}, a uint8 label map holds at most 256")
    probs = sliding_window_predict(
        model,
        image,
        patch_size=patch_size,
        stride=stride,
        num_classes=num_classes,
        sw_batch_size=sw_batch_size,
        device=device,
        amp_dtype=amp_dtype,
    )
    label = np.empty(tuple(probs.shape[1:]), dtype=np.uint8)
    for row in range(0, label.shape[0], _ROWS_PER_BLOCK):  # no int64 argmax of the whole volume at once
        label[row : row + _ROWS_PER_BLOCK] = probs[:, row : row + _ROWS_PER_BLOCK].argmax(0).numpy()
    if largest_component:
        kept = np.zeros_like(label)
        for c in range(1, num_classes):
            kept[keep_largest_component(label == c)] = c
        label = kept
    return label, probs
