"""Sliding-window inference: the batched grid equals the field's one-window loop; the CPU-optimised network."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from crln.errors import CrlnError
from crln.inference import (
    entropy_map,
    optimize_for_inference,
    predict_case,
    sliding_window_predict,
    window_starts,
)
from crln.models import VNet
from reference_sliding_window import reference_sliding_window
from reference_sliding_window import window_starts as reference_window_starts


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
    ("shape", "patch", "stride"),
    [
        ((183, 140, 88), (112, 112, 80), (18, 18, 4)),  # an LA crop with the LA protocol
        ((9, 30, 17), (12, 12, 8), (5, 7, 8)),  # padded on x, stride == patch on z
        ((40, 33, 16), (16, 16, 16), (16, 4, 1)),
    ],
)
def test_windows_are_the_fields_in_the_fields_order(shape: tuple, patch: tuple, stride: tuple) -> None:
    # Each voxel holds its own flat index (+1, so that padding reads 0): a window's first voxel tells
    # where the window starts. The model sees exactly the field's windows, x outer and z inner.
    image = (np.arange(np.prod(shape), dtype=np.float64) + 1).reshape(shape)
    seen: list[tuple[int, ...]] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        for window in x[:, 0]:
            nonzero = torch.nonzero(window)[0]  # first voxel of the volume inside the (padded) window
            index = int(window[tuple(nonzero)]) - 1
            seen.append(tuple(int(v) - int(o) for v, o in zip(np.unravel_index(index, shape), nonzero)))
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    sliding_window_predict(model, image, patch_size=patch, stride=stride, num_classes=2, sw_batch_size=3)
    pads = [max(p - n, 0) // 2 for n, p in zip(shape, patch)]
    axes = [reference_window_starts(max(n, p), p, s) for n, p, s in zip(shape, patch, stride)]
    expected = [tuple(start - pad for start, pad in zip(corner, pads)) for corner in itertools.product(*axes)]
    assert seen == expected
    assert [window_starts(max(n, p), p, s) for n, p, s in zip(shape, patch, stride)] == axes


def test_one_window_per_batch_is_bit_identical_to_the_reference() -> None:
    # Same windows, same order, same per-voxel count: the field's exact numbers, not merely close ones.
    rng = np.random.default_rng(3)
    image = rng.normal(size=(23, 19, 11)).astype(np.float32)
    net = _net()
    expected, _ = reference_sliding_window(net, image, (16, 12, 8), (5, 4, 2), num_classes=3)
    probs = sliding_window_predict(net, image, patch_size=(16, 12, 8), stride=(5, 4, 2), num_classes=3, sw_batch_size=1)
    assert np.array_equal(probs.numpy(), expected)


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


def _vnet_with_statistics(seed: int = 0) -> VNet:
    """A small VNet in eval mode whose BatchNorm statistics and affine terms are far from the identity."""
    torch.manual_seed(seed)
    net = VNet(n_filters=4, num_classes=3)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_optimize_for_inference_folds_batchnorm_and_keeps_the_logits() -> None:
    net = _vnet_with_statistics()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = optimize_for_inference(net, "cpu")
    assert fast is not net
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules())  # every VNet BN follows a conv
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last_3d)
        for m in fast.modules()
        if hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 5
    )
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    # The caller's network is untouched.
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    image = torch.randn(40, 36, 20).numpy()
    plain = sliding_window_predict(net, image, patch_size=(32, 32, 16), stride=(8, 4, 4), num_classes=3)
    optimized = sliding_window_predict(fast, image, patch_size=(32, 32, 16), stride=(8, 4, 4), num_classes=3)
    torch.testing.assert_close(optimized, plain, atol=1e-5, rtol=0)


def test_optimize_for_inference_refuses_training_mode_and_leaves_other_devices_alone() -> None:
    net = _vnet_with_statistics()
    with pytest.raises(ValueError, match="eval"):
        optimize_for_inference(net.train(), "cpu")
    net.eval()
    assert optimize_for_inference(net, "cuda") is net  # CUDA settings belong to Performance


def test_batchnorm_without_running_statistics_is_not_folded() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4, track_running_stats=False)).eval()
    fast = optimize_for_inference(net, "cpu")
    assert isinstance(fast[1], nn.BatchNorm3d)
    x = torch.randn(2, 1, 6, 6, 6)
    torch.testing.assert_close(fast(x), net(x))
