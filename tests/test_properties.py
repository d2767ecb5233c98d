"""Property tests (hypothesis) of the metrics, the patch transforms and sliding-window tiling.

Each property holds for every input, not only for the examples in ``test_metrics.py`` and
``test_data_transforms.py``: Dice and Jaccard are symmetric, bounded and tied by J = D / (2 - D);
empty masks follow the documented policy; distances are symmetric where medpy's are, invariant
under translation and scale with the spacing; crops, flips and padding keep image and label aligned.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from crln.data.transforms import gaussian_noise, pad_to_size, random_crop, random_rot_flip
from crln.inference import sliding_window_predict
from crln.metrics import asd, assd, bootstrap, case_metrics, dice, hd95, jaccard, keep_largest_component, summarize

EXAMPLES = 40
TOLERANCE = 1e-9
SHAPES = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 5))
SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def mask_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks of one random shape."""
    shape = draw(SHAPES)
    return draw(arrays(np.bool_, shape)), draw(arrays(np.bool_, shape))


def _non_empty(mask: np.ndarray, index: int = 0) -> np.ndarray:
    mask = mask.copy()
    mask.flat[index % mask.size] = True
    return mask


# ----------------------------------------------------------------------------------------------------------
# metrics


@settings(max_examples=EXAMPLES, deadline=None)
@given(mask_pairs())
def test_dice_and_jaccard_are_symmetric_bounded_and_tied(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    d, j = dice(a, b), jaccard(a, b)
    assert d == dice(b, a) and j == jaccard(b, a)
    assert 0.0 <= j <= d <= 1.0
    assert math.isclose(j, d / (2.0 - d), abs_tol=TOLERANCE)
    # 1 exactly when the masks agree (two empty masks agree: the documented policy), 0 when disjoint
    assert (d == 1.0) == bool(np.array_equal(a, b))
    assert (d == 0.0) == (not (a & b).any() and (a | b).any())


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES, st.integers(0, 1000), st.booleans())
def test_empty_mask_policy(shape: tuple[int, int, int], index: int, prediction_empty: bool) -> None:
    empty = np.zeros(shape, bool)
    assert dice(empty, empty) == 1.0 and jaccard(empty, empty) == 1.0
    assert asd(empty, empty) == 0.0 and hd95(empty, empty) == 0.0 and assd(empty, empty) == 0.0
    present = _non_empty(empty, index)
    pred, gt = (empty, present) if prediction_empty else (present, empty)
    assert dice(pred, gt) == 0.0 and jaccard(pred, gt) == 0.0
    assert math.isnan(asd(pred, gt)) and math.isnan(hd95(pred, gt)) and math.isnan(assd(pred, gt))


@settings(max_examples=EXAMPLES, deadline=None)
@given(mask_pairs(), st.integers(0, 1000))
def test_distances_symmetric_where_pooled_and_bounded(pair: tuple[np.ndarray, np.ndarray], index: int) -> None:
    a, b = _non_empty(pair[0], index), _non_empty(pair[1], index * 7 + 3)
    diagonal = math.dist((0, 0, 0), [s - 1 for s in a.shape])
    assert math.isclose(hd95(a, b), hd95(b, a), abs_tol=TOLERANCE)
    assert math.isclose(assd(a, b), assd(b, a), abs_tol=TOLERANCE)
    # the pooled mean lies between the two directed means (it is their weighted mean)
    low, high = sorted((asd(a, b), asd(b, a)))
    assert low - TOLERANCE <= assd(a, b) <= high + TOLERANCE
    for value in (hd95(a, b), asd(a, b), assd(a, b)):
        assert 0.0 <= value <= diagonal + TOLERANCE


@settings(max_examples=EXAMPLES, deadline=None)
@given(mask_pairs(), st.integers(0, 1000), st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)))
def test_metrics_are_translation_invariant(
    pair: tuple[np.ndarray, np.ndarray], index: int, offset: tuple[int, int, int]
) -> None:
    a, b = _non_empty(pair[0], index), _non_empty(pair[1], index + 1)
    margin = 3
    big_shape = tuple(s + 2 * margin for s in a.shape)
    moved = []
    for mask in (a, b):
        big = np.zeros(big_shape, bool)
        big[tuple(slice(o, o + s) for o, s in zip(offset, a.shape, strict=True))] = mask
        moved.append(big)
    for metric in (dice, jaccard, asd, hd95):
        assert math.isclose(metric(a, b), metric(*moved), abs_tol=TOLERANCE), metric.__name__


@settings(max_examples=EXAMPLES, deadline=None)
@given(mask_pairs(), st.integers(0, 1000), st.sampled_from([0.5, 1.5, 3.0]))
def test_distances_scale_with_isotropic_spacing(pair: tuple[np.ndarray, np.ndarray], index: int, scale: float) -> None:
    a, b = _non_empty(pair[0], index), _non_empty(pair[1], index + 2)
    for metric in (asd, hd95, assd):
        assert math.isclose(metric(a, b, scale), scale * metric(a, b), rel_tol=1e-9, abs_tol=TOLERANCE)


@settings(max_examples=EXAMPLES, deadline=None)
@given(mask_pairs(), st.integers(1, 255), st.integers(1, 255))
def test_any_nonzero_value_is_object(pair: tuple[np.ndarray, np.ndarray], value_a: int, value_b: int) -> None:
    a, b = pair
    coded_a, coded_b = a.astype(np.uint8) * value_a, b.astype(np.uint8) * value_b
    assert dice(coded_a, coded_b) == dice(a, b) and jaccard(coded_a, coded_b) == jaccard(a, b)


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES.flatmap(lambda s: st.tuples(arrays(np.uint8, s, elements=st.integers(0, 3)), arrays(np.uint8, s))))
def test_multiclass_means_are_means_of_the_classes(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, gt = pair[0], pair[1] % 4
    row = case_metrics(pred, gt, num_classes=4)
    for name in ("dice", "jaccard"):
        per_class = [row[f"{name}_{c}"] for c in (1, 2, 3)]
        assert math.isclose(row[name], float(np.mean(per_class)), abs_tol=TOLERANCE)
        assert all(per_class[c - 1] == (dice if name == "dice" else jaccard)(pred == c, gt == c) for c in (1, 2, 3))


@settings(max_examples=EXAMPLES, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 6))))
def test_largest_component_is_one_connected_subset(mask: np.ndarray) -> None:
    kept = keep_largest_component(mask)
    assert not (kept & ~mask).any()
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    assert int(kept.sum()) == (int(sizes.max()) if count else 0)
    assert ndimage.label(kept, structure=np.ones((3, 3, 3)))[1] == min(count, 1)
    assert np.array_equal(keep_largest_component(kept), kept)


finite_or_nan = st.one_of(st.floats(0.0, 100.0), st.just(math.nan))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(finite_or_nan, min_size=1, max_size=12), SEEDS, st.integers(1, 50))
def test_summary_excludes_and_counts_undefined_cases(values: list[float], seed: int, resamples: int) -> None:
    stats = summarize([{"hd95": v} for v in values], n_resamples=resamples, seed=seed)["hd95"]
    defined = [v for v in values if not math.isnan(v)]
    assert stats["n"] == len(defined) and stats["n_undefined"] == len(values) - len(defined)
    if not defined:
        assert all(math.isnan(stats[k]) for k in ("mean", "std", "boot_mean", "boot_std"))
        return
    low, high = min(defined) - TOLERANCE, max(defined) + TOLERANCE
    assert low <= stats["mean"] <= high and low <= stats["boot_mean"] <= high
    assert stats["std"] >= 0.0 and stats["boot_std"] >= 0.0
    assert bootstrap(defined, n_resamples=resamples, seed=seed) == (stats["boot_mean"], stats["boot_std"])


# ----------------------------------------------------------------------------------------------------------
# patch transforms


def _coded_volume(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An image whose voxel values are unique positive codes, and a label derived from it voxel-wise
    (``code % 7``, so that zero padding of both still agrees)."""
    image = np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)
    return image, (image.astype(np.int64) % 7).astype(np.uint8)


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES, st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)))
def test_padding_centres_the_volume_in_zeros(shape: tuple[int, int, int], size: tuple[int, int, int]) -> None:
    image, label = _coded_volume(shape)
    padded, padded_label = pad_to_size(image, label, size)
    assert padded.shape == tuple(max(n, s) for n, s in zip(shape, size, strict=True)) == padded_label.shape
    starts = [(p - n) // 2 for p, n in zip(padded.shape, shape, strict=True)]
    inside = tuple(slice(a, a + n) for a, n in zip(starts, shape, strict=True))
    assert np.array_equal(padded[inside], image) and np.array_equal(padded_label[inside], label)
    assert padded.sum() == image.sum()  # everything else is zero


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES, st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), SEEDS, st.integers(1, 3))
def test_crop_keeps_image_and_label_aligned(
    shape: tuple[int, int, int], size: tuple[int, int, int], seed: int, channels: int
) -> None:
    image, label = _coded_volume(shape)
    stacked = np.stack([image * (c + 1) for c in range(channels)])
    crop, crop_label = random_crop(stacked, label, size, np.random.default_rng(seed))
    assert crop.shape == (channels, *size) and crop_label.shape == size
    assert np.array_equal((crop[0].astype(np.int64) % 7).astype(np.uint8), crop_label)
    assert all(np.array_equal(crop[c], crop[0] * (c + 1)) for c in range(channels))
    again, _ = random_crop(stacked, label, size, np.random.default_rng(seed))
    assert np.array_equal(crop, again)  # a pure function of the generator


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES, SEEDS)
def test_rot_flip_is_an_in_plane_symmetry_that_keeps_alignment(shape: tuple[int, int, int], seed: int) -> None:
    image, label = _coded_volume(shape)
    out, out_label = random_rot_flip(image[None], label, np.random.default_rng(seed))
    out = out[0]
    assert np.array_equal((out.astype(np.int64) % 7).astype(np.uint8), out_label)
    assert out.shape[2] == shape[2] and sorted(out.shape[:2]) == sorted(shape[:2])
    # each slice along D keeps its voxels (rotations and flips act in the H-W plane only)
    for d in range(shape[2]):
        assert np.array_equal(np.sort(out[..., d], axis=None), np.sort(image[..., d], axis=None))
    candidates = [np.flip(np.rot90(image, k, axes=(0, 1)), axis=a) for k in range(4) for a in (0, 1)]
    assert any(c.shape == out.shape and np.array_equal(c, out) for c in candidates)


@settings(max_examples=EXAMPLES, deadline=None)
@given(SHAPES, SEEDS, st.floats(0.0, 2.0), st.floats(0.0, 1.0))
def test_noise_is_clipped_seeded_and_float32(shape: tuple[int, int, int], seed: int, sigma: float, clip: float) -> None:
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    noisy = gaussian_noise(image, np.random.default_rng(seed), sigma, clip)
    assert noisy.dtype == np.float32 and noisy.shape == image.shape
    assert np.abs(noisy - image).max(initial=0.0) <= clip + 1e-6
    assert np.array_equal(noisy, gaussian_noise(image, np.random.default_rng(seed), sigma, clip))
    if sigma == 0.0:
        assert np.array_equal(noisy, image)


# ----------------------------------------------------------------------------------------------------------
# sliding-window tiling


@settings(max_examples=15, deadline=None)
@given(
    st.tuples(st.integers(3, 16), st.integers(3, 16), st.integers(3, 10)),
    st.tuples(st.sampled_from([4, 8]), st.sampled_from([4, 8]), st.sampled_from([4, 8])),
    st.tuples(st.integers(2, 8), st.integers(2, 8), st.integers(2, 8)),
    st.integers(1, 3),
    SEEDS,
)
def test_tiling_of_a_pointwise_model_is_exact(
    shape: tuple[int, int, int], patch: tuple[int, int, int], stride: tuple[int, int, int], batch: int, seed: int
) -> None:
    """Every window gives a voxel the same probabilities under a 1x1x1 model, so whatever the tiling,
    padding and overlap counts, the result must be that model's softmax over the whole volume."""
    stride = tuple(min(s, p) for s, p in zip(stride, patch, strict=True))
    torch.manual_seed(seed % 2**31)
    model = torch.nn.Conv3d(1, 3, kernel_size=1).eval()
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    probs = sliding_window_predict(model, image, patch_size=patch, stride=stride, num_classes=3, sw_batch_size=batch)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(image)[None, None]), dim=1)[0]
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape), rtol=1e-5, atol=1e-5)
