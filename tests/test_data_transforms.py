"""Transforms keep image and label aligned; crops always have the patch size."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crln.data import gaussian_noise, pad_to_size, random_crop, random_rot_flip


def _aligned(shape=(20, 16, 12), seed=0):
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) > 0.6).astype(np.uint8)
    image = (label * 10 + rng.normal(0, 0.1, shape)).astype(np.float32)
    return image, label


def test_crop_rot_flip_alignment() -> None:
    image, label = _aligned()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        im, lb = random_rot_flip(image, label, rng)
        im, lb = random_crop(im, lb, (10, 10, 8), rng)
        assert im.shape == lb.shape == (10, 10, 8)
        np.testing.assert_array_equal(im > 5, lb == 1)


def test_channel_first_alignment() -> None:
    image, label = _aligned()
    image = np.stack([image, -image])
    for seed in range(6):
        rng = np.random.default_rng(seed)
        im, lb = random_rot_flip(image, label, rng)
        im, lb = random_crop(im, lb, (8, 8, 8), rng)
        assert im.shape == (2, 8, 8, 8) and lb.shape == (8, 8, 8)
        np.testing.assert_array_equal(im[0] > 5, lb == 1)
        np.testing.assert_array_equal(im[1] < -5, lb == 1)


def test_rot_flip_covers_all_variants() -> None:
    image, label = _aligned((6, 6, 3))
    variants = set()
    for seed in range(200):
        _, lb = random_rot_flip(image, label, np.random.default_rng(seed))
        variants.add(lb.tobytes())
    # as the field's RandomRotFlip always flips, it reaches the 4 reflections of the square, no pure rotation
    assert len(variants) == 4
    assert not variants & {np.rot90(label, k, axes=(0, 1)).tobytes() for k in range(4)}


def test_crop_pads_small_volume() -> None:
    image, label = _aligned((5, 7, 3))
    im, lb = random_crop(image, label, (8, 8, 6), np.random.default_rng(0))
    assert im.shape == lb.shape == (8, 8, 6)
    assert lb.sum() == label.sum()  # nothing lost, only padded
    np.testing.assert_array_equal(im > 5, lb == 1)


def test_pad_symmetric() -> None:
    image, label = _aligned((4, 4, 4))
    im, lb = pad_to_size(image, label, (8, 5, 2))
    assert im.shape == lb.shape == (8, 5, 4)
    np.testing.assert_array_equal(lb[2:6, 0:4, :], label)
    assert im[:2].sum() == 0 and im[6:].sum() == 0


def test_noise_clip_and_seeded() -> None:
    image = np.zeros((10, 10, 10), np.float32)
    a = gaussian_noise(image, np.random.default_rng(1), sigma=1.0, clip=0.2)
    b = gaussian_noise(image, np.random.default_rng(1), sigma=1.0, clip=0.2)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and np.abs(a).max() <= 0.2 + 1e-6 and a.std() > 0.1
    # sigma 0 turns the noise off: the values come back as they were (a non-zero image, so that adding
    # noise or zeroing the image would both show)
    varied = np.random.default_rng(2).normal(size=(10, 10, 10)).astype(np.float32)
    quiet = gaussian_noise(varied, np.random.default_rng(1), 0.0, 0.2)
    assert quiet.dtype == np.float32
    np.testing.assert_array_equal(quiet, varied)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    size=st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10)),
    seed=st.integers(0, 2**31 - 1),
)
def test_crop_always_patch_size(shape, size, seed) -> None:
    image = np.ones(shape, np.float32)
    label = np.ones(shape, np.uint8)
    im, lb = random_crop(image, label, size, np.random.default_rng(seed))
    assert im.shape == size and lb.shape == size


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 5)),
    seed=st.integers(0, 2**31 - 1),
)
def test_rot_flip_preserves_label_multiset(shape, seed) -> None:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, size=shape).astype(np.uint8)
    image = label.astype(np.float32)
    im, lb = random_rot_flip(image, label, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(np.bincount(lb.ravel(), minlength=4), np.bincount(label.ravel(), minlength=4))
    np.testing.assert_array_equal(im, lb)
    assert sorted(lb.shape[:2]) == sorted(shape[:2]) and lb.shape[2] == shape[2]
