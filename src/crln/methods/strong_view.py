"""The CRLN authors' strong view of the unlabelled batch (``method.strong_view=authors``).

Facts from the authors' code (``Yaan-Wang/CRLN``, ``VnetLA/train_semisup.py``, ``build_data.py``,
``module_list.py``; read for facts only), applied to the teacher's weak view and its pseudo-label
distribution alike, in this order:

1. in-plane zoom by ``s ~ U(0.5, 1.5)`` per sample (image: smooth interpolation, pseudo-labels:
   nearest), back to the patch size by a centre crop or, when zoomed out, reflection padding first;
2. per-volume min-max scaling of the image to [0, 1];
3. CutMix with a *2-D* box through the full depth: ``λ ~ Beta(4, 4)`` once per batch, box sides
   ``⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋``, a centre per sample, partner ``randperm(B)`` (with B = 2 a sample
   is mixed with itself half of the time, which leaves it unchanged);
4. per sample: brightness ``×U(0.75, 1.25)`` clipped to [0, 1] with p = 0.8; Gaussian noise
   ``clip(N(0, 0.1²), ±0.2)`` with p = 0.5; a second rot90 / flip in the H-W plane with p = 0.5;
5. min-max scaling to [0, 1] again.

Where we differ (``docs/method.md``): the code marks the zoomed-out border of the pseudo-label as
"ignore"; we reflect the pseudo-label with the image, so every voxel keeps a label aligned with its
input. The code's image resize is bicubic; ours is (bi)linear in-plane.

All randomness comes from torch's global generator, which the checkpoint stores, so a resumed run
draws the same views. Shapes: images ``(B, C, H, W, D)``, pseudo-labels ``(B, K, H, W, D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["authors_strong_view", "cutmix_full_depth", "minmax_per_sample", "photometric_rot_flip", "zoom_in_plane"]

ZOOM_RANGE = (0.5, 1.5)
CUTMIX_BETA = 4.0
BRIGHTNESS_RANGE, BRIGHTNESS_P = (0.75, 1.25), 0.8
NOISE_SIGMA, NOISE_CLIP, NOISE_P = 0.1, 0.2, 0.5
ROT_FLIP_P = 0.5


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _fit_in_plane(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Reflect-pad (when smaller) and centre-crop ``x`` ``(1, C, h, w, D)`` to ``size`` = (H, W) in-plane."""
    pads = [max(target - now, 0) for now, target in zip(x.shape[2:4], size, strict=True)]
    if any(pads):
        (ph, pw) = pads
        x = F.pad(x, (0, 0, pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
    h0 = round((x.shape[2] - size[0]) / 2)
    w0 = round((x.shape[3] - size[1]) / 2)
    return x[:, :, h0 : h0 + size[0], w0 : w0 + size[1]]


def zoom_in_plane(image: Tensor, probs: Tensor, scale_range: tuple[float, float] = ZOOM_RANGE) -> tuple[Tensor, Tensor]:
    """Step 1: zoom each sample in the H-W plane by ``s ~ U(scale_range)``, keeping the patch size."""
    H, W, D = image.shape[2:]
    images, labels = [], []
    for b in range(image.shape[0]):
        s = _uniform(*scale_range)
        size = (max(2, int(H * s)), max(2, int(W * s)), D)
        zoomed = F.interpolate(image[b : b + 1].float(), size=size, mode="trilinear", align_corners=False)
        relabelled = F.interpolate(probs[b : b + 1].float(), size=size, mode="nearest")
        images.append(_fit_in_plane(zoomed, (H, W)).to(image.dtype))
        labels.append(_fit_in_plane(relabelled, (H, W)).to(probs.dtype))
    return torch.cat(images), torch.cat(labels)


def minmax_per_sample(image: Tensor) -> Tensor:
    """Steps 2 and 5: scale each sample and channel to [0, 1] (a constant volume becomes 0)."""
    flat = image.flatten(2)
    low = flat.amin(dim=2).view(*image.shape[:2], 1, 1, 1)
    span = (flat.amax(dim=2).view(*image.shape[:2], 1, 1, 1) - low).clamp_min(1e-8)
    return (image - low) / span


def cutmix_full_depth(image: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Step 3: paste a full-depth box of a partner sample (``randperm``, possibly itself) into each sample."""
    B, _, H, W, _ = image.shape
    lam = float(torch.distributions.Beta(CUTMIX_BETA, CUTMIX_BETA).sample())
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    partner = torch.randperm(B).tolist()
    mixed_image, mixed_probs = image.clone(), probs.clone()
    for b in range(B):
        ch = int(torch.randint(H // 8, H, ()))
        cw = int(torch.randint(W // 8, W, ()))
        h1, h2 = max(ch - cut_h // 2, 0), min(ch + cut_h // 2, H)
        w1, w2 = max(cw - cut_w // 2, 0), min(cw + cut_w // 2, W)
        mixed_image[b, :, h1:h2, w1:w2] = image[partner[b], :, h1:h2, w1:w2]
        mixed_probs[b, :, h1:h2, w1:w2] = probs[partner[b], :, h1:h2, w1:w2]
    return mixed_image, mixed_probs


def photometric_rot_flip(
    image: Tensor,
    probs: Tensor,
    brightness_p: float = BRIGHTNESS_P,
    noise_p: float = NOISE_P,
    rot_flip_p: float = ROT_FLIP_P,
) -> tuple[Tensor, Tensor]:
    """Step 4: brightness (clipped to [0, 1]) and noise on the image; rot90 + flip on image and pseudo-label."""
    images, labels = [], []
    square = image.shape[2] == image.shape[3]
    for b in range(image.shape[0]):
        x, p = image[b], probs[b]  # (C, H, W, D), (K, H, W, D)
        if float(torch.rand(())) < brightness_p:
            x = (x * _uniform(*BRIGHTNESS_RANGE)).clamp(0.0, 1.0)
        if float(torch.rand(())) < noise_p:
            x = x + (torch.randn_like(x) * NOISE_SIGMA).clamp(-NOISE_CLIP, NOISE_CLIP)
        if float(torch.rand(())) < rot_flip_p:
            # Odd k swaps H and W: only a square plane can take it and keep the batch's shape.
            k = int(torch.randint(0, 4, ())) if square else 2 * int(torch.randint(0, 2, ()))
            axis = 1 + int(torch.randint(0, 2, ()))
            x = torch.rot90(x, k, dims=(1, 2)).flip(axis)
            p = torch.rot90(p, k, dims=(1, 2)).flip(axis)
        images.append(x)
        labels.append(p)
    return torch.stack(images), torch.stack(labels)


def authors_strong_view(weak: Tensor, probs: Tensor, cutmix: bool = True) -> tuple[Tensor, Tensor]:
    """Steps 1–5: the strong view ``(B, C, H, W, D)`` in [0, 1] and its aligned pseudo-labels ``(B, K, H, W, D)``
    (``cutmix=False`` skips step 3, for the "no CutMix" baseline rows)."""
    image, probs = zoom_in_plane(weak, probs)
    image = minmax_per_sample(image)
    if cutmix:
        image, probs = cutmix_full_depth(image, probs)
    image, probs = photometric_rot_flip(image, probs)
    return minmax_per_sample(image), probs
