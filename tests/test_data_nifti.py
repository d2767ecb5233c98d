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
    assert ds.dataset_json.num_classes == 3 and ds.dataset_json.channel_names == {"0": "T1", "1": "T2"}
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
    assert ds.ids() == ["brats_001"] and ds.dataset_json.labels == {"bg": 0, "x": 1, "y": 2}
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


def _corrupt_mid_stream(path: Path) -> None:
    """Flip one byte in the middle of the deflate stream: nibabel alone decodes such a file to garbage."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_gzip_stream_is_refused(tmp_path: Path) -> None:
    image, label = _vol((32, 32, 32))
    ds = _pair(tmp_path, image, label)
    _corrupt_mid_stream(tmp_path / "imagesTr" / "c_0000.nii.gz")
    with pytest.raises(CrlnError, match=r"c_0000\.nii\.gz: unreadable NIfTI file: corrupt gzip stream \(CRC check"):
        ds.load("c")
    with pytest.raises(CrlnError, match=r"c_0000\.nii\.gz: unreadable NIfTI file: corrupt gzip stream"):
        read_nifti_volume(tmp_path / "imagesTr" / "c_0000.nii.gz")
    _corrupt_mid_stream(tmp_path / "labelsTr" / "c.nii.gz")
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", image, AFFINE)
    with pytest.raises(CrlnError, match=r"labelsTr/c\.nii\.gz: unreadable NIfTI file: corrupt gzip stream"):
        ds.load("c")


def test_nifti2_and_uncompressed_files_read(tmp_path: Path) -> None:
    image, _ = _vol()
    nib.save(nib.Nifti2Image(image, AFFINE), str(tmp_path / "two.nii.gz"))
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "plain.nii"))
    for name in ("two.nii.gz", "plain.nii"):
        case = read_nifti_volume(tmp_path / name, normalize=False)
        np.testing.assert_array_equal(case.image, image)
        np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)


@pytest.mark.parametrize("value", [3.2e37, -2e6])
def test_absurd_intensities_are_refused(tmp_path: Path, value: float) -> None:
    image, _ = _vol()
    image[1, 2, 3] = value
    write_nifti(tmp_path / "x.nii.gz", image)
    with pytest.raises(CrlnError, match=r"x\.nii\.gz: image intensities in \[.*\], expected \|value\| <= 1e\+06"):
        read_nifti_volume(tmp_path / "x.nii.gz")


def test_channels_are_zscored(tmp_path: Path) -> None:
    image, label = _vol()
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", image * 300 + 1000, AFFINE)
    write_nifti(tmp_path / "imagesTr" / "c_0001.nii.gz", np.full_like(image, 7.0), AFFINE)
    write_nifti(tmp_path / "labelsTr" / "c.nii.gz", label, AFFINE)
    case = NiftiDataset(tmp_path).load("c")
    assert case.image.dtype == np.float32 and case.image.shape == (2, 10, 9, 6)
    assert abs(case.image[0].mean()) < 1e-5 and abs(case.image[0].std() - 1) < 1e-5
    np.testing.assert_array_equal(case.image[1], 0.0)  # a constant channel: no division by std 0
    assert case.channel_sources == tuple(str(tmp_path / "imagesTr" / f"c_000{k}.nii.gz") for k in (0, 1))
    single = read_nifti_volume(tmp_path / "imagesTr" / "c_0000.nii.gz")
    np.testing.assert_allclose(single.image, case.image[0], atol=1e-6)


def test_labelled_ids_and_orphan_labels(tmp_path: Path) -> None:
    image, label = _vol()
    for cid in ("c0", "c1", "c2"):
        write_nifti(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz", image, AFFINE)
    for cid in ("c1", "c2", "ghost"):
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", label, AFFINE)
    ds = NiftiDataset(tmp_path)
    assert ds.ids() == ["c0", "c1", "c2"] and ds.labeled_ids() == ["c1", "c2"]
    assert ds.orphan_labels() == [tmp_path / "labelsTr" / "ghost.nii.gz"]
    assert ds.orphan_labels("test") == []


def test_phantom_folder_with_channels_and_unlabelled_images(tmp_path: Path) -> None:
    write_phantom_nifti_dataset(tmp_path, n_train=4, n_test=1, shape=(16, 16, 12), channels=2, n_unlabeled=1)
    ds = NiftiDataset(tmp_path)
    assert ds.dataset_json.num_channels == 2 and ds.dataset_json.num_classes == 2
    assert ds.ids() == ["case_000", "case_001", "case_002", "case_003"] and ds.labeled_ids() == ds.ids()[:3]
    case = ds.load("case_000")
    assert case.image.shape == (2, 16, 16, 12)
    np.testing.assert_allclose(case.image[1], -case.image[0], atol=1e-5)  # channel 1: inverted contrast
