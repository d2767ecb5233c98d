"""Phantoms (seeded, classes present, finite), h5 phantom dataset, labelled/unlabelled/validation split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from crln.data import H5Dataset, make_phantom, split_train, validate_case, write_phantom_h5_dataset
from crln.errors import CrlnError


def test_phantom_seeded() -> None:
    a, b, c = make_phantom(3, (32, 32, 24)), make_phantom(3, (32, 32, 24)), make_phantom(4, (32, 32, 24))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_phantom_classes_and_contrast(num_classes: int) -> None:
    case = make_phantom(7, (48, 48, 32), num_classes)
    assert case.image.shape == (48, 48, 32) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) == set(range(num_classes))
    assert np.isfinite(case.image).all()
    assert abs(float(case.image.mean())) < 1e-3 and abs(float(case.image.std()) - 1) < 1e-3
    fg = case.image[case.label == 1].mean()
    bg = case.image[case.label == 0].mean()
    assert fg - bg > 0.5  # learnable
    validate_case(case, num_classes=num_classes, require_label=True)


def test_phantom_size_varies_and_is_fast() -> None:
    t0 = time.perf_counter()
    sizes = [int((make_phantom(s).label > 0).sum()) for s in range(3)]
    assert (time.perf_counter() - t0) / 3 < 1.5
    assert len(set(sizes)) == 3 and min(sizes) > 500


def test_phantom_h5_dataset(tmp_path: Path) -> None:
    root = write_phantom_h5_dataset(tmp_path / "ph", n_train=3, n_test=2, shape=(16, 16, 12), num_classes=3)
    ds = H5Dataset(root)
    train, test = ds.ids("train"), ds.ids("test")
    assert len(train) == 3 and len(test) == 2 and not set(train) & set(test)
    cases = ds.load_many(train + test)
    assert all(set(np.unique(c.label).tolist()) == {0, 1, 2} for c in cases)
    assert not np.array_equal(cases[0].image, cases[1].image)


def test_split_train() -> None:
    ids = [f"c{i}" for i in range(10)]
    s = split_train(ids, labeled=2, validation=3)
    assert s.labeled == ["c0", "c1"] and s.validation == ["c7", "c8", "c9"]
    assert s.unlabeled == ["c2", "c3", "c4", "c5", "c6"]
    # the labelled set does not depend on the validation size
    assert split_train(ids, labeled=2).labeled == s.labeled
    assert split_train(ids, labeled=2).unlabeled == ids[2:]
    assert split_train(ids, labeled=7, validation=3).unlabeled == []


def test_split_errors() -> None:
    ids = [f"c{i}" for i in range(5)]
    with pytest.raises(CrlnError, match="labeled = 0"):
        split_train(ids, labeled=0)
    with pytest.raises(CrlnError, match=r"labeled \(6\).*holds only 5"):
        split_train(ids, labeled=6)
    with pytest.raises(CrlnError, match=r"labeled \(4\) \+ validation \(2\).*holds only 5"):
        split_train(ids, labeled=4, validation=2)
