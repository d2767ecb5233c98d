"""nnU-Net / MSD NIfTI folders: round trip of affine and spacing, multi-channel, errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from crln.data import NiftiDataset, read_nifti_volume, write_nifti, write_phantom_nifti_dataset
from crln.errors import CrlnError

AFFINE = np.array([[0.0, -0.8, 0.0, 10.0], [0.7, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])


def _vol(shape=(10, 9, 6), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, 3, size=shape).astype(np.uint8)


def test_write_read_roundtrip(tmp_path: Path) -> None:
    image, label = _vol()
    write_nifti(tmp_path / "img_0000.nii.gz", image, AFFINE)
    case = read_nifti_volume(tmp_path / "img_0000.nii.gz", normalize=False)
    assert case.case_id == "img" and case.label is None
    np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(case.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    np.testing.assert_array_equal(case.image, image)
    write_nifti(tmp_path / "lab.nii.gz", label, AFFINE)
    assert nib.load(tmp_path / "lab.nii.gz").get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0000.nii.gz", "lab.nii.gz"]


def test_nnunet_dataset_multichannel(tmp_path: Path) -> None:
    for cid, seed in (("c1", 0), ("c2", 1)):
        image, label = _vol(seed=seed)
        write_nifti(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz", image, AFFINE)
        write_nifti(tmp_path / "imagesTr" / f"{cid}_0001.nii.gz", image * 2, AFFINE)
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", label, AFFINE)
    write_nifti(tmp_path / "imagesTs" / "t1_0000.nii.gz", image, AFFINE)
    write_nifti(tmp_path / "imagesTs" / "t1_0001.nii.gz", image, AFFINE)
    meta = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = NiftiDataset(tmp_path)
    assert ds.ids("train") == ["c1", "c2"] and ds.ids("test") == ["t1"]
    assert ds.num_classes == 3 and ds.channel_names == {"0": "T1", "1": "T2"}
    case = ds.load("c2", normalize=False)
    img, lab = _vol(seed=1)
    assert case.image.shape == (2, 10, 9, 6)
    np.testing.assert_array_equal(case.image[1], img * 2)
    np.testing.assert_array_equal(case.label, lab)
    np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)
    test_case = ds.load("t1")
    assert test_case.label is None


def test_msd_layout(tmp_path: Path) -> None:
    # MSD: imagesTr/<id>.nii.gz (4D channel-last for multi-modal), labels dict "0": "background"
    image, label = _vol()
    write_nifti(tmp_path / "imagesTr" / "brats_001.nii.gz", np.stack([image, image + 1], -1), AFFINE)
    write_nifti(tmp_path / "labelsTr" / "brats_001.nii.gz", label, AFFINE)
    (tmp_path / "imagesTr" / "._brats_001.nii.gz").write_bytes(b"\0mac")  # macOS junk in MSD tarballs
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "2": "y"}}))
    ds = NiftiDataset(tmp_path)
    assert ds.ids() == ["brats_001"] and ds.labels == {"bg": 0, "x": 1, "y": 2}
    case = ds.load("brats_001", normalize=False)
    assert case.image.shape == (2, 10, 9, 6)
    np.testing.assert_array_equal(case.image[1], image + 1)


def test_phantom_nifti_dataset(tmp_path: Path) -> None:
    write_phantom_nifti_dataset(tmp_path, n_train=2, n_test=1, shape=(16, 16, 12), spacing=(0.5, 0.5, 2.0))
    ds = NiftiDataset(tmp_path)
    assert len(ds.ids("train")) == 2 and len(ds.ids("test")) == 1
    case = ds.load(ds.ids("train")[0])
    assert case.spacing == pytest.approx((0.5, 0.5, 2.0))
    assert set(np.unique(case.label).tolist()) == {0, 1}


def _pair(tmp_path: Path, image, label, affine_img=AFFINE, affine_lab=AFFINE) -> NiftiDataset:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", image, affine_img)
    write_nifti(tmp_path / "labelsTr" / "c.nii.gz", label, affine_lab)
    return NiftiDataset(tmp_path)


def test_shape_mismatch(tmp_path: Path) -> None:
    image, label = _vol()
    ds = _pair(tmp_path, image, label[:, :, :5])
    with pytest.raises(CrlnError, match=r"c\.nii\.gz: label shape \(10, 9, 5\) differs"):
        ds.load("c")


def test_affine_mismatch(tmp_path: Path) -> None:
    image, label = _vol()
    moved = AFFINE.copy()
    moved[0, 3] += 0.01
    ds = _pair(tmp_path, image, label, affine_lab=moved)
    with pytest.raises(CrlnError, match=r"c\.nii\.gz: affine differs"):
        ds.load("c")
    small = AFFINE.copy()
    small[0, 3] += 1e-6
    write_nifti(tmp_path / "labelsTr" / "c.nii.gz", label, small)
    assert NiftiDataset(tmp_path).load("c").label is not None


def test_non_3d(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", np.zeros((4, 4, 4, 2, 2), np.float32))
    with pytest.raises(CrlnError, match=r"c_0000\.nii\.gz: image has shape"):
        NiftiDataset(tmp_path).load("c", with_label=False)


def test_unreadable(tmp_path: Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(CrlnError, match=r"bad\.nii\.gz: unreadable NIfTI"):
        read_nifti_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(CrlnError, match=r"missing\.nii\.gz: file not found"):
        read_nifti_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    with pytest.raises(CrlnError, match=r"zero\.nii\.gz: file is empty"):
        read_nifti_volume(tmp_path / "zero.nii.gz")


def test_missing_training_label(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", _vol()[0])
    with pytest.raises(CrlnError, match=r"c\.nii\.gz: file not found"):
        NiftiDataset(tmp_path).load("c")
