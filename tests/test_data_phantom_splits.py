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


@pytest.mark.parametrize("num_classes", [1, 257])
def test_phantom_class_counts_a_uint8_label_cannot_hold_are_one_clear_error(num_classes: int) -> None:
    with pytest.raises(CrlnError, match=rf"num_classes = {num_classes}, expected 2 to 256"):
        make_phantom(0, (8, 8, 8), num_classes)


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


class _Listed:
    """A dataset with a case list and no notion of label files (the h5 layout)."""

    def __init__(self, ids: list[str]) -> None:
        self._ids = ids

    def ids(self, split: str) -> list[str]:
        return list(self._ids)


def _data(labeled: int, validation: int, val_split: str = "") -> object:
    from crln.config import DataConfig

    return DataConfig(labeled=labeled, validation=validation, val_split=val_split)


def test_plan_split_keeps_the_first_n_rule_for_lists() -> None:
    from crln.data.splits import plan_split

    split, rule = plan_split(_Listed([f"c{i}" for i in range(6)]), _data(2, 1))
    assert split == split_train([f"c{i}" for i in range(6)], labeled=2, validation=1)
    assert rule.splitlines()[0].startswith("data: 2 labelled, 3 unlabelled, 1 validation cases; list 'train'")
    assert "  labelled: c0, c1" in rule and "  validation: c5" in rule


def _partly_labelled(tmp_path: Path, labelled: tuple[str, ...]) -> object:
    from crln.data import NiftiDataset, write_nifti

    image = np.zeros((8, 8, 8), np.float32)
    for cid in ("c0", "c1", "c2", "c3"):
        write_nifti(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz", image)
    for cid in labelled:
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", image.astype(np.uint8))
    return NiftiDataset(tmp_path)


def test_plan_split_by_label_files(tmp_path: Path) -> None:
    """Images without a label are the unlabelled pool; the labelled ones give data.labeled and data.validation."""
    from crln.data.splits import plan_split

    ds = _partly_labelled(tmp_path, ("c1", "c2", "c3", "orphan"))
    split, rule = plan_split(ds, _data(2, 1))
    assert (split.labeled, split.unlabeled, split.validation) == (["c1", "c2"], ["c0"], ["c3"])
    assert "3 of the 4 images of 'train' have a label file" in rule and "the 1 without one are unlabelled" in rule
    assert rule.count("orphan.nii.gz") == 1 and "without an image" in rule
    split, _ = plan_split(ds, _data(2, 0))  # a labelled case beyond data.labeled trains as unlabelled
    assert (split.labeled, split.unlabeled, split.validation) == (["c1", "c2"], ["c3", "c0"], [])
    with pytest.raises(CrlnError, match=r"= 4 cases requested, but only 3 of the 4 images of 'train' have a label"):
        plan_split(ds, _data(3, 1))


def test_plan_split_of_a_fully_labelled_folder_is_the_first_n_rule(tmp_path: Path) -> None:
    from crln.data.splits import plan_split

    split, rule = plan_split(_partly_labelled(tmp_path, ("c0", "c1", "c2", "c3")), _data(1, 1))
    assert (split.labeled, split.unlabeled, split.validation) == (["c0"], ["c1", "c2"], ["c3"])
    assert "list 'train'" in rule


def test_images_unlabelled_folder_joins_the_unlabelled_pool(tmp_path: Path) -> None:
    from crln.data import write_nifti
    from crln.data.splits import plan_split

    ds = _partly_labelled(tmp_path, ("c0", "c1", "c2", "c3"))
    for cid in ("u0", "u1"):
        write_nifti(tmp_path / "imagesUnlabelled" / f"{cid}_0000.nii.gz", np.ones((8, 8, 8), np.float32))
    split, rule = plan_split(ds, _data(2, 1))
    assert (split.labeled, split.unlabeled, split.validation) == (["c0", "c1"], ["c2", "u0", "u1"], ["c3"])
    assert "the 2 images of imagesUnlabelled/ are unlabelled" in rule
    assert ds.load("u1").label is None and ds.load("u1", with_label=True).label is None
    write_nifti(tmp_path / "imagesUnlabelled" / "c1_0000.nii.gz", np.ones((8, 8, 8), np.float32))
    ds._files.clear()  # rescan the folders
    with pytest.raises(CrlnError, match=r"imagesUnlabelled: case 'c1' is also in imagesTr/, expected distinct"):
        plan_split(ds, _data(2, 1))
