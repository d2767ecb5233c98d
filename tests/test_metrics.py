"""Metrics: parity with medpy (the test oracle only), the empty-mask policy, the summary."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from crln.errors import CrlnError
from crln.metrics import (
    asd,
    asd_and_hd95,
    assd,
    bootstrap,
    case_metrics,
    dice,
    hd95,
    jaccard,
    keep_largest_component,
    summarize,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")

SPACINGS = [None, (0.625, 0.625, 2.5), (1.3, 0.7, 1.0)]


def _assert_like_medpy(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None, *, with_assd: bool = True
) -> None:
    assert dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-6)
    assert jaccard(pred, gt) == pytest.approx(medpy_binary.jc(pred, gt), abs=1e-6)
    expected_asd = medpy_binary.asd(pred, gt, spacing)
    expected_hd95 = medpy_binary.hd95(pred, gt, spacing)
    assert asd(pred, gt, spacing) == pytest.approx(expected_asd, abs=1e-6)
    assert hd95(pred, gt, spacing) == pytest.approx(expected_hd95, abs=1e-6)
    # One pass gives exactly the two separate values.
    assert asd_and_hd95(pred, gt, spacing) == (asd(pred, gt, spacing), hd95(pred, gt, spacing))
    if with_assd:
        assert assd(pred, gt, spacing) == pytest.approx(medpy_binary.assd(pred, gt, spacing), abs=1e-6)
    row = case_metrics(pred.astype(np.uint8), gt.astype(np.uint8), num_classes=2, spacing=spacing)
    assert row["asd"] == pytest.approx(expected_asd, abs=1e-6)
    assert row["hd95"] == pytest.approx(expected_hd95, abs=1e-6)


def _la_labels(root: Path, count: int) -> list[np.ndarray]:
    folders = sorted((root / "2018LA_Seg_Training Set").iterdir())[:count]
    labels = []
    for folder in folders:
        with h5py.File(folder / "mri_norm2.h5", "r") as handle:
            labels.append(handle["label"][:].astype(bool))
    return labels


def _variants(gt: np.ndarray) -> list[np.ndarray]:
    """Plausible "predictions": eroded, dilated and shifted, holed versions of the label."""
    eroded = ndimage.binary_erosion(gt, iterations=2)
    dilated_shifted = np.roll(ndimage.binary_dilation(gt, iterations=3), (4, -2, 1), axis=(0, 1, 2))
    holed = gt.copy()
    holed[::7, ::5, ::3] = False
    holed[gt.shape[0] // 2 :, : gt.shape[1] // 3] = False
    return [eroded, dilated_shifted, holed]


def test_parity_with_medpy_on_real_la_labels(la_root: Path) -> None:
    for gt in _la_labels(la_root, 2):
        for pred in _variants(gt):
            for spacing in SPACINGS[:2]:
                _assert_like_medpy(pred, gt, spacing, with_assd=False)
            # In voxel units every distance is the square root of an integer, so the values are exactly medpy's.
            assert asd_and_hd95(pred, gt) == (medpy_binary.asd(pred, gt), medpy_binary.hd95(pred, gt))


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int], threshold: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0, mode="wrap")
    return field / field.std() > threshold


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_parity_with_medpy_on_random_blobs(seed: int, spacing: tuple[float, ...] | None) -> None:
    rng = np.random.default_rng(seed)
    shape = (24, 20, 16)
    pred, gt = _blobs(rng, shape, 0.8), _blobs(rng, shape, 0.5)  # wrap mode: blobs cross the border
    assert pred[[0, -1]].any() and gt[:, [0, -1]].any()
    _assert_like_medpy(pred, gt, spacing)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_parity_with_medpy_on_border_and_single_voxels(spacing: tuple[float, ...] | None) -> None:
    shape = (12, 10, 8)
    single_a, single_b = np.zeros(shape, bool), np.zeros(shape, bool)
    single_a[0, 0, 0] = True
    single_b[11, 3, 7] = True
    _assert_like_medpy(single_a, single_b, spacing)
    _assert_like_medpy(single_a, single_a, spacing)
    full = np.ones(shape, bool)  # every border voxel is surface (erosion border_value=0)
    _assert_like_medpy(full, single_b, spacing)
    slab = np.zeros(shape, bool)
    slab[:, :, :3] = True
    _assert_like_medpy(slab, full, spacing)
    _assert_like_medpy(single_b, slab, spacing)


def test_empty_mask_policy() -> None:
    empty, one = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    one[2, 2, 2] = True
    assert (dice(empty, empty), jaccard(empty, empty), asd(empty, empty), hd95(empty, empty)) == (1.0, 1.0, 0.0, 0.0)
    for pred, gt in ((empty, one), (one, empty)):
        assert dice(pred, gt) == 0.0 and jaccard(pred, gt) == 0.0
        assert math.isnan(asd(pred, gt)) and math.isnan(hd95(pred, gt)) and math.isnan(assd(pred, gt))
    assert asd_and_hd95(empty, empty) == (0.0, 0.0)
    assert all(math.isnan(value) for value in asd_and_hd95(empty, one) + asd_and_hd95(one, empty))
    row = case_metrics(empty.astype(np.uint8), one.astype(np.uint8), num_classes=2)
    assert row["dice"] == 0.0 and math.isnan(row["hd95"])


def test_case_metrics_multiclass_and_errors() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, size=(10, 10, 6)).astype(np.uint8)
    pred = gt.copy()
    pred[:5] = 0
    row = case_metrics(pred, gt, num_classes=3, spacing=(1.0, 1.0, 2.0))
    for c in (1, 2):
        assert row[f"dice_{c}"] == pytest.approx(medpy_binary.dc(pred == c, gt == c))
        assert row[f"hd95_{c}"] == pytest.approx(medpy_binary.hd95(pred == c, gt == c, (1.0, 1.0, 2.0)))
    assert row["dice"] == pytest.approx((row["dice_1"] + row["dice_2"]) / 2)
    assert row["asd"] == pytest.approx((row["asd_1"] + row["asd_2"]) / 2)
    no_class_2 = np.where(pred == 2, 0, pred).astype(np.uint8)
    row = case_metrics(no_class_2, gt, num_classes=3)
    assert math.isnan(row["hd95_2"]) and math.isnan(row["hd95"]) and not math.isnan(row["hd95_1"])
    with pytest.raises(CrlnError, match="shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(CrlnError, match="spacing"):
        hd95(gt, gt, spacing=(1.0, 1.0))
    with pytest.raises(CrlnError, match="num_classes"):
        case_metrics(gt, gt, num_classes=1)


masks = arrays(np.bool_, (6, 5, 4))


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_dice_symmetric_and_bounded(a: np.ndarray, b: np.ndarray) -> None:
    assert dice(a, b) == dice(b, a)
    assert 0.0 <= dice(a, b) <= 1.0
    assert 0.0 <= jaccard(a, b) <= dice(a, b) + 1e-12  # J <= D always


@settings(max_examples=60, deadline=None)
@given(masks, st.sampled_from(SPACINGS))
def test_equal_masks_are_perfect(a: np.ndarray, spacing: tuple[float, ...] | None) -> None:
    a = a.copy()
    a[0, 0, 0] = True  # non-empty
    assert dice(a, a) == 1.0 and jaccard(a, a) == 1.0
    assert hd95(a, a, spacing) == 0.0 and asd(a, a, spacing) == 0.0


def test_bootstrap_deterministic_and_close_to_mean() -> None:
    values = np.random.default_rng(3).normal(0.85, 0.05, size=40)
    first = bootstrap(values, n_resamples=200, seed=7)
    assert first == bootstrap(values, n_resamples=200, seed=7)
    assert first != bootstrap(values, n_resamples=200, seed=8)
    assert first[0] == pytest.approx(values.mean(), abs=0.01)
    # The std of resample means estimates the standard error of the mean.
    assert first[1] == pytest.approx(values.std() / np.sqrt(values.size), rel=0.3)
    assert bootstrap([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in bootstrap([]))
    with pytest.raises(CrlnError, match="n_resamples"):
        bootstrap(values, n_resamples=0)


def test_summarize_counts_undefined_distances() -> None:
    rows = [
        {"dice": 0.9, "hd95": 2.0},
        {"dice": 0.8, "hd95": 4.0},
        {"dice": 0.0, "hd95": math.nan},
    ]
    summary = summarize(rows, n_resamples=50, seed=1)
    assert summary["dice"]["n"] == 3 and summary["dice"]["n_undefined"] == 0
    assert summary["dice"]["mean"] == pytest.approx(1.7 / 3)
    hd = summary["hd95"]
    assert hd["n"] == 2 and hd["n_undefined"] == 1
    assert hd["mean"] == pytest.approx(3.0) and hd["std"] == pytest.approx(1.0)
    assert 2.0 <= hd["boot_mean"] <= 4.0 and not math.isnan(hd["boot_std"])
    assert set(hd) == {"mean", "std", "boot_mean", "boot_std", "n", "n_undefined"}
    assert summary == summarize(rows, n_resamples=50, seed=1)
    none_defined = summarize([{"hd95": math.nan}])["hd95"]
    assert none_defined["n"] == 0 and none_defined["n_undefined"] == 1 and math.isnan(none_defined["mean"])


def test_keep_largest_component_uses_26_connectivity() -> None:
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = 1  # a diagonal chain: one 26-component
    mask[5:7, 5:7, 6] = 1  # 4 voxels, face-connected
    kept = keep_largest_component(mask)
    assert kept.dtype == bool and kept.sum() == 4 and kept[5:7, 5:7, 6].all()
    mask[3, 3, 3] = mask[4, 4, 4] = 1  # chain grows to 5 voxels: now the largest
    kept = keep_largest_component(mask)
    assert kept.sum() == 5 and kept[0, 0, 0] and not kept[5, 5, 6]
    assert not keep_largest_component(np.zeros((3, 3, 3))).any()
