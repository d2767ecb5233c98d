from __future__ import annotations

import pytest
import torch

from crln.models import VNet

CASES = [
    # (kwargs, input shape, logits shape)
    ({}, (1, 1, 32, 32, 16), (1, 2, 32, 32, 16)),
    ({"num_classes": 4, "n_filters": 8}, (2, 1, 32, 16, 48), (2, 4, 32, 16, 48)),
    ({"in_channels": 2, "normalization": "groupnorm", "n_filters": 16}, (1, 2, 16, 16, 16), (1, 2, 16, 16, 16)),
    ({"normalization": "instancenorm", "dropout": 0.5, "n_filters": 4}, (1, 1, 16, 32, 16), (1, 2, 16, 32, 16)),
]


@pytest.mark.parametrize(("kwargs", "input_shape", "expected"), CASES)
def test_vnet_shapes(kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    net = VNet(**kwargs).eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(input_shape), return_features=True)
    assert logits.shape == expected
    f = net.n_filters
    b, _, h, w, d = input_shape
    assert feats["quarter"].shape == (b, 4 * f, h // 4, w // 4, d // 4)
    assert feats["half"].shape == (b, 2 * f, h // 2, w // 2, d // 2)
    assert feats["full"].shape == (b, f, h, w, d)


def test_field_standard_size() -> None:
    # The field's VNet (n_filters=16, batchnorm) has about 9.45 M parameters.
    n = sum(p.numel() for p in VNet().parameters())
    assert 9.40e6 < n < 9.50e6


def test_features_match_plain_forward() -> None:
    torch.manual_seed(0)
    net = VNet(n_filters=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, return_features=True)[0])


@pytest.mark.parametrize("shape", [(1, 1, 56, 56, 40), (1, 1, 32, 32)])
def test_bad_input_shape_is_explained(shape: tuple) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        VNet(n_filters=4)(torch.randn(shape))


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"normalization": "layer"}, {"dropout": 1.0}])
def test_bad_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VNet(**kwargs)
