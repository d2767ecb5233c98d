"""The field's 3D-UNet: shapes, decoder features, size, registry and config selection."""

from __future__ import annotations

import pytest
import torch

from crln.config import load_config
from crln.errors import CrlnError
from crln.models import MODELS, UNet3D, VNet, build_model


@pytest.mark.parametrize(
    ("kwargs", "input_shape", "expected"),
    [
        ({}, (1, 1, 32, 32, 16), (1, 2, 32, 32, 16)),
        ({"num_classes": 3, "n_filters": 4, "dropout": 0.3}, (2, 1, 32, 16, 48), (2, 3, 32, 16, 48)),
        ({"in_channels": 2, "normalization": "batchnorm", "n_filters": 8}, (1, 2, 16, 16, 16), (1, 2, 16, 16, 16)),
    ],
)
def test_unet3d_shapes_and_features(kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    net = UNet3D(**kwargs).eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(input_shape), return_features=True)
    assert logits.shape == expected
    b, _, h, w, d = input_shape
    f = net.n_filters
    assert (
        feats["quarter"].shape
        == (b, net.feature_channels["quarter"], h // 4, w // 4, d // 4)
        == (b, 4 * f, h // 4, w // 4, d // 4)
    )
    assert feats["half"].shape == (b, 2 * f, h // 2, w // 2, d // 2)
    assert feats["full"].shape == (b, f, h, w, d)


def test_field_unet3d_size() -> None:
    # SSL4MIS's unet_3D(feature_scale=4, n_classes=2, in_channels=1): 16-32-64-128-256 channels, two
    # 3x3x3 convolutions per level, non-affine instance norm, trilinear up-sampling + concatenation.
    assert sum(p.numel() for p in UNet3D().parameters()) == 5_884_050


def test_unet3d_features_match_plain_forward_and_dropout_is_train_only() -> None:
    torch.manual_seed(0)
    net = UNet3D(n_filters=4, dropout=0.3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, return_features=True)[0])
        net.train()
        assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("shape", [(1, 1, 40, 32, 32), (1, 1, 32, 32)])
def test_unet3d_bad_input_shape_is_explained(shape: tuple) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet3D(n_filters=4)(torch.randn(shape))


def test_registry_and_config_select_the_network() -> None:
    assert {"vnet": VNet, "unet3d": UNet3D} == MODELS
    net = build_model("unet3d", in_channels=1, num_classes=3, n_filters=4, normalization="instancenorm", dropout=0.0)
    assert isinstance(net, UNet3D) and net.num_classes == 3
    assert load_config("brats").model.name == "unet3d"
    with pytest.raises(CrlnError, match=r"model\.name: expected one of unet3d, vnet, got 'unet'"):
        load_config("demo", ["model.name=unet"])
    with pytest.raises(CrlnError, match=r"model\.normalization: expected one of"):
        load_config("demo", ["model.normalization=layernorm"])
