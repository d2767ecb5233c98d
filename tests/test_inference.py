"""Sliding-window inference: MONAI tiling equals the field's one-window loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from torch import nn

from crln.errors import CrlnError
from crln.inference import entropy_map, monai_overlap, predict_case, sliding_window_predict
from reference_sliding_window import reference_sliding_window, window_starts


def _net(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A tiny random conv net: padded convs keep the spatial size, so border effects matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, num_classes, 3, padding=1)).eval()


class _Counting(nn.Module):
    """Counts the windows the wrapped net sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize(
    ("patch", "stride"),
    [
        ((112, 112, 80), (18, 18, 4)),
        ((96, 96, 96), (16, 16, 16)),
        ((7, 13, 16), (3, 5, 16)),
        ((10, 10, 10), (1, 9, 10)),
    ],
)
@pytest.mark.parametrize("size", [1, 5, 7, 33, 100, 112, 113, 127, 200, 1000])
def test_monai_windows_match_field_positions(patch: tuple, stride: tuple, size: int) -> None:
    # MONAI's own interval and window code, fed our overlap, gives the field's starts on each axis
    # (MONAI's windows are the product of the per-axis starts, as the field's nested loops).
    for p, s, o in zip(patch, stride, monai_overlap(patch, stride)):
        image = (max(size, p),)  # MONAI pads to the patch first, as the field does
        interval = _get_scan_interval(image, (p,), 1, (o,))
        starts = [sl[0].start for sl in dense_patch_slices(image, (p,), interval)]
        assert starts == window_starts(image[0], p, s)


def test_overlap_truncation_is_exact_for_all_small_patches() -> None:
    # 1 - s/p can give int(p * (1 - o)) == s - 1 in floating point; ours never does.
    for p in range(1, 257):
        for s in range(1, p + 1):
            (o,) = monai_overlap((p,), (s,))
            assert 0.0 <= o < 1.0
            assert int(p * (1 - o)) == s, (p, s)


def test_equals_direct_forward_when_volume_is_patch() -> None:
    net = _net()
    image = torch.randn(16, 12, 8).numpy()
    image.flags.writeable = False  # read-only input is accepted without a torch warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = sliding_window_predict(net, image, patch_size=(16, 12, 8), stride=(4, 4, 2), num_classes=3)
    with torch.no_grad():
        direct = torch.softmax(net(torch.tensor(image)[None, None]), dim=1)[0]
    assert probs.shape == (3, 16, 12, 8) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    torch.testing.assert_close(probs, direct, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "patch", "stride"),
    [
        ((20, 20, 12), (16, 16, 8), (6, 6, 2)),  # larger on every axis, (18,18,4)-like strides
        ((10, 25, 9), (16, 16, 8), (6, 6, 2)),  # smaller on x, larger on y and z
        ((16, 11, 5), (16, 16, 8), (6, 6, 2)),  # equal on x, smaller on y and z
        ((9, 9, 9), (12, 12, 12), (4, 4, 4)),  # smaller everywhere, padded
        ((29, 13, 24), (12, 12, 12), (4, 4, 4)),  # (16,16,16)-like cubic strides, odd sizes
        ((37, 20, 17), (16, 16, 8), (16, 16, 8)),  # stride == patch: no overlap
    ],
)
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_equals_reference_loop(shape: tuple, patch: tuple, stride: tuple, sw_batch_size: int) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.normal(size=shape).astype(np.float32)
    net = _Counting(_net())
    expected, windows = reference_sliding_window(net, image, patch, stride, num_classes=3)
    net.windows = 0
    probs = sliding_window_predict(
        net, image, patch_size=patch, stride=stride, num_classes=3, sw_batch_size=sw_batch_size
    )
    assert net.windows == windows
    assert probs.shape == (3, *shape)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5, rtol=0)


def test_la_sized_window_count() -> None:
    # A typical LA crop with the LA protocol: count the windows without a real net.
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    probs = sliding_window_predict(
        model,
        np.zeros((183, 140, 88), np.float32),
        patch_size=(112, 112, 80),
        stride=(18, 18, 4),
        num_classes=2,
        sw_batch_size=8,
    )
    expected = np.prod([len(window_starts(s, p, t)) for s, p, t in zip((183, 140, 88), (112, 112, 80), (18, 18, 4))])
    assert sum(calls) == expected == 5 * 3 * 3
    torch.testing.assert_close(probs, torch.full((2, 183, 140, 88), 0.5))


def test_multichannel_input_amp_and_devices() -> None:
    torch.manual_seed(1)
    net = nn.Conv3d(2, 2, 3, padding=1).eval()
    image = torch.randn(2, 10, 9, 7)
    probs = sliding_window_predict(net, image, patch_size=(8, 8, 8), stride=(4, 4, 4), num_classes=2, device="cpu")
    assert probs.shape == (2, 10, 9, 7)
    torch.testing.assert_close(probs.sum(0), torch.ones(10, 9, 7))
    low = sliding_window_predict(
        net, image, patch_size=(8, 8, 8), stride=(4, 4, 4), num_classes=2, amp_dtype=torch.bfloat16
    )
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, probs, atol=2e-2, rtol=0)


def test_rejects_bad_arguments() -> None:
    net = _net(2)
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(CrlnError, match="stride"):
        sliding_window_predict(net, image, patch_size=(8, 8, 8), stride=(9, 4, 4), num_classes=2)
    with pytest.raises(CrlnError, match="patch_size"):
        sliding_window_predict(net, image, patch_size=(8, 8), stride=(4, 4, 4), num_classes=2)
    with pytest.raises(CrlnError, match="num_classes = 3"):
        sliding_window_predict(net, image, patch_size=(8, 8, 8), stride=(4, 4, 4), num_classes=3)
    with pytest.raises(CrlnError, match="image shape"):
        sliding_window_predict(net, np.zeros((8, 8)), patch_size=(8, 8, 8), stride=(4, 4, 4), num_classes=2)
    with pytest.raises(TypeError, match="Tensor"):
        sliding_window_predict(lambda x: (net(x),), image, patch_size=(8, 8, 8), stride=(4, 4, 4), num_classes=2)


def test_predict_case_label_map_and_largest_component() -> None:
    # A "model" that thresholds its input: two blobs, the smaller one removed by post-processing.
    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x * 10 - 5], dim=1)

    image = np.zeros((20, 20, 10), np.float32)
    image[2:8, 2:8, 2:8] = 1
    image[14:16, 14:16, 4:6] = 1
    label, probs = predict_case(model, image, patch_size=(12, 12, 8), stride=(4, 4, 2), num_classes=2)
    assert label.dtype == np.uint8 and label.shape == (20, 20, 10) and probs.shape == (2, 20, 20, 10)
    assert label.sum() == 6**3 + 2**3
    kept, _ = predict_case(
        model, image, patch_size=(12, 12, 8), stride=(4, 4, 2), num_classes=2, largest_component=True
    )
    assert kept.sum() == 6**3 and kept[2:8, 2:8, 2:8].all()


def test_entropy_map() -> None:
    probs = torch.zeros(3, 2, 2, 2)
    probs[0] = 1.0
    probs[:, 1] = 1 / 3
    ent = entropy_map(probs)
    assert ent.shape == (2, 2, 2)
    torch.testing.assert_close(ent[0], torch.zeros(2, 2))
    torch.testing.assert_close(ent[1], torch.full((2, 2), float(np.log(3))))
    torch.testing.assert_close(entropy_map(probs.numpy()), ent)
