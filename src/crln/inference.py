"""Sliding-window inference with the field's evaluation protocol.

The field (UA-MT / MC-Net ``test_single_case``) predicts a volume as follows, per axis of size
``size`` with patch ``patch`` and stride ``stride``:

1. if ``size < patch``, pad with zeros to ``patch``: ``(patch - size) // 2`` before, the rest after;
2. tile with starts ``min(stride * i, size - patch)`` for ``i in range(ceil((size - patch) / stride) + 1)``
   (``size`` after padding);
3. softmax each tile's logits, add the tiles' probabilities and divide by the count map;
4. crop the padding off.

:func:`sliding_window_predict` reproduces this with :func:`monai.inferers.sliding_window_inference`
(batched tiles). MONAI pads the same way (``diff // 2`` before), and with ``mode="constant"`` its
count map is the field's. Its windows: the interval is ``int(patch * (1 - overlap))`` (``patch``
when the axis equals the patch), the number of windows is ``first d with d * interval + patch >= size``
plus one, i.e. ``ceil((size - patch) / interval) + 1``, and the starts ``d * interval`` are clamped to
``size - patch``: the field's positions whenever ``interval == stride <= patch``. The overlap is chosen
as ``1 - (stride + 0.5) / patch`` so that the floating-point product lands half a voxel above
``stride`` and ``int`` truncates it to exactly ``stride`` (``1 - stride / patch`` can give
``stride - 1``); see :func:`monai_overlap`. The field's default strides are ``(18, 18, 4)`` on LA
and ``(16, 16, 16)`` elsewhere (config values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

from crln.errors import CrlnError
from crln.metrics import keep_largest_component

__all__ = ["entropy_map", "monai_overlap", "predict_case", "sliding_window_predict"]


def _triple(name: str, value: Sequence[int] | int) -> tuple[int, int, int]:
    """``value`` as three positive ints (one per spatial axis)."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise CrlnError(f"sliding window: {name} is {value!r}, expected 3 positive integers")
    return int(values[0]), int(values[1]), int(values[2])


def monai_overlap(patch_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis MONAI ``overlap`` whose scan interval ``int(patch * (1 - overlap))`` is exactly ``stride``.

    Args:
        patch_size: window size per axis.
        stride: wanted step per axis, ``1 <= stride <= patch``.

    Returns:
        One overlap in ``[0, 1)`` per axis.

    Raises:
        CrlnError: a stride is not in ``[1, patch]`` (a larger stride would leave voxels unpredicted).
    """
    overlaps = []
    for p, s in zip(patch_size, stride, strict=True):
        if not 1 <= s <= p:
            raise CrlnError(
                f"sliding window: stride {tuple(stride)} must be between 1 and the patch {tuple(patch_size)}"
            )
        # Half a voxel of headroom: int() of (s + 0.5) * (1 ± eps) is s; s == p needs overlap 0.
        overlaps.append(0.0 if s == p else 1.0 - (s + 0.5) / p)
    return tuple(overlaps)


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

    The model is called as is (put it in eval mode first) under ``torch.inference_mode()``, on
    batches of up to ``sw_batch_size`` windows moved to ``device``; each window's logits are
    turned into float32 softmax probabilities before averaging. The averaged volume lives on
    ``output_device``, so device memory holds only one batch of windows.

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
    overlap = monai_overlap(patch, step)
    if sw_batch_size < 1:
        raise CrlnError(f"sliding window: sw_batch_size is {sw_batch_size}, expected at least 1")
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = image.copy()  # torch warns on read-only arrays (e.g. from a cache); we never write it
    volume = torch.as_tensor(image)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise CrlnError(f"sliding window: image shape {tuple(volume.shape)}, expected (H, W, D) or (C, H, W, D)")
    compute_device = _resolve_device(model, device)
    out_device = torch.device(output_device) if output_device is not None else torch.device("cpu")
    # The input stays where it is (usually CPU); MONAI moves one batch of windows at a time.
    volume = volume.to(dtype=torch.float32)[None]

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

    with torch.inference_mode():
        probs = sliding_window_inference(
            volume,
            roi_size=patch,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="constant",
            padding_mode="constant",
            cval=0.0,
            sw_device=compute_device,
            device=out_device,
        )
    return torch.as_tensor(probs)[0].to(dtype=torch.float32)


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
    label = probs.argmax(0).numpy().astype(np.uint8)
    if largest_component:
        kept = np.zeros_like(label)
        for c in range(1, num_classes):
            kept[keep_largest_component(label == c)] = c
        label = kept
    return label, probs
