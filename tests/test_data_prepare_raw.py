"""Raw-format readers and the LA / Pancreas-CT / BraTS19 preprocessing on small synthetic files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crln.data import H5Dataset
from crln.data.prepare_raw import (
    FIELD_SPLITS,
    _field_split,
    crop_box,
    prepare_brats_raw,
    prepare_la_raw,
    prepare_pancreas_raw,
)
from crln.data.raw_io import read_dicom_series, read_nrrd
from crln.errors import CrlnError
from raw_fixtures import (
    BRATS_OUTLIER,
    HU_PANCREAS,
    write_brats_raw,
    write_la_raw,
    write_pancreas_raw,
)


def _manifest(dst: Path) -> dict:
    return json.loads((dst / "prepare.json").read_text())


def _lists(dst: Path, suffix: str, names: list[str]) -> dict[str, list[str]]:
    return {n: (dst / f"{n}{suffix}").read_text().split() for n in names}


def _bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    hits = np.argwhere(mask)
    return [(int(lo), int(hi) + 1) for lo, hi in zip(hits.min(0), hits.max(0), strict=True)]


# --- splits and crops ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["la", "pancreas", "brats"])
def test_field_split_has_the_field_counts_on_the_full_set(dataset: str) -> None:
    counts, _ = FIELD_SPLITS[dataset]
    ids = [f"c{i:03d}" for i in range(sum(counts.values()))]
    split = _field_split(ids, counts, seed=0)
    assert {k: len(v) for k, v in split.items()} == counts
    assert sorted(itertools.chain(*split.values())) == ids
    assert split == _field_split(ids, counts, seed=0) != _field_split(ids, counts, seed=1)


def test_field_split_of_a_small_set_keeps_every_split() -> None:
    counts, _ = FIELD_SPLITS["brats"]
    for n in (3, 5, 10):
        split = _field_split([f"c{i}" for i in range(n)], counts, seed=0)
        assert all(split[k] for k in counts) and sum(len(v) for v in split.values()) == n
        assert len(split["train"]) >= len(split["test"]) >= 1


def test_crop_box_margin_min_size_and_kept_axes() -> None:
    mask = np.zeros((30, 30, 10), bool)
    mask[10:14, 20:22, 3:5] = True
    box = crop_box(mask, (2, 3, 0), (0, 10, 0), crop_axes=(True, True, False))
    assert box == (slice(8, 16), slice(13, 29), slice(0, 10))  # y: 2 voxels grown to 10, then 3 of margin
    assert crop_box(mask, (9, 9, 9))[1] == slice(11, 30)  # clipped at the volume's end
    with pytest.raises(CrlnError, match="empty"):
        crop_box(np.zeros((4, 4, 4), bool), (1, 1, 1))


# --- LA (NRRD) ----------------------------------------------------------------------------------


def test_la_crops_x_y_around_the_atrium_keeps_every_slice(tmp_path: Path) -> None:
    ids = write_la_raw(tmp_path / "raw", n_cases=5)
    dst = tmp_path / "LA"
    summary = prepare_la_raw(tmp_path / "raw", dst, margin=2, min_size=0, log=lambda _: None)
    assert summary["cases"] == 5 and summary["splits"] == {"train": 4, "test": 1}
    lists = _lists(dst, ".list", ["train", "test"])
    assert sorted(lists["train"] + lists["test"]) == ids
    manifest = _manifest(dst)
    dataset = H5Dataset(dst)
    for cid in ids:
        assert dataset.path(cid) == dst / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5"
        case = dataset.load(cid)
        raw = read_nrrd(tmp_path / "raw" / "Training Set" / cid / "lgemri.nrrd")
        atrium = read_nrrd(tmp_path / "raw" / "Training Set" / cid / "laendo.nrrd").data == 255
        record = manifest["cases"][cid]
        assert record["source_spacing"] == pytest.approx([0.625] * 3)
        box = tuple(slice(*b) for b in record["crop"])
        # whole-volume z-score, then the crop (the field's order); every slice kept
        whole = raw.data.astype(np.float32)
        np.testing.assert_allclose(case.image, ((whole - whole.mean()) / whole.std())[box], rtol=1e-5, atol=1e-5)
        assert case.image.shape[2] == raw.data.shape[2]
        np.testing.assert_array_equal(case.label, atrium[box])
        raw_box = _bbox(atrium)
        for axis, (lo, hi) in enumerate(_bbox(case.label)[:2]):  # 2 voxels of margin, unless the volume ends first
            assert lo == min(2, raw_box[axis][0])
            assert case.label.shape[axis] - hi == min(2, raw.data.shape[axis] - raw_box[axis][1])


def test_la_default_crop_is_at_least_the_patch_side(tmp_path: Path) -> None:
    write_la_raw(tmp_path / "raw", n_cases=2, shape=(48, 40, 12))
    prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)
    for record in _manifest(tmp_path / "LA")["cases"].values():
        assert record["crop"][:2] == [[0, 48], [0, 40]]  # 112 + margins exceed this small volume


def test_la_refuses_a_label_without_255(tmp_path: Path) -> None:
    import nrrd

    (cid,) = write_la_raw(tmp_path / "raw", n_cases=1)
    path = tmp_path / "raw" / "Training Set" / cid / "laendo.nrrd"
    data, header = nrrd.read(str(path))
    nrrd.write(str(path), (data > 0).astype(np.uint8), header)
    with pytest.raises(CrlnError, match=r"laendo.nrrd: label values \[0, 1\], expected 0 and 255"):
        prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)


def test_la_needs_cases(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrlnError, match=r"no <ID>/lgemri\.nrrd found"):
        prepare_la_raw(tmp_path / "empty", tmp_path / "LA")


# --- Pancreas-CT (DICOM + NIfTI) ----------------------------------------------------------------


def test_dicom_series_is_sorted_by_position_in_hounsfield_units(tmp_path: Path) -> None:
    truth = write_pancreas_raw(tmp_path, n_cases=1)["PANCREAS_0001"]
    volume = read_dicom_series(tmp_path / "Pancreas-CT" / "PANCREAS_0001")
    np.testing.assert_array_equal(volume.data, truth["hu"])  # slope 2, intercept -1024 applied
    assert volume.spacing == pytest.approx(truth["spacing"])  # slice spacing from positions, not SliceThickness
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], [15.0, 12.0, -200.0, 1.0])  # LPS origin as RAS


def test_pancreas_hu_window_spacing_and_label(tmp_path: Path) -> None:
    truth = write_pancreas_raw(tmp_path / "raw", n_cases=2)
    dst = tmp_path / "Pancreas"
    summary = prepare_pancreas_raw(tmp_path / "raw", dst, log=lambda _: None)
    assert summary["splits"] == {"train": 1, "test": 1}
    manifest = _manifest(dst)
    dataset = H5Dataset(dst)
    for cid, info in truth.items():
        assert dataset.path(cid) == dst / "data" / f"{cid}_norm.h5"
        case, record = dataset.load(cid), manifest["cases"][cid]
        assert record["source_spacing"] == pytest.approx(info["spacing"])
        assert record["spacing"] == pytest.approx([1.0, 1.0, 1.0], abs=0.03)
        hu = case.image * record["intensity_std"] + record["intensity_mean"]
        # air (-1000) and bone (+1000) are clipped to the window's ends
        assert hu.min() == pytest.approx(-125.0, abs=1e-3) and hu.max() == pytest.approx(275.0, abs=1e-3)
        # the label sits on the pancreas (reoriented from the label file's own axis order)
        interior = ndimage.binary_erosion(case.label > 0, iterations=2)
        assert interior.any() and np.median(hu[interior]) == pytest.approx(HU_PANCREAS, abs=1.0)
        volume_mm3 = info["pancreas"].sum() * np.prod(info["spacing"])
        assert case.label.sum() == pytest.approx(volume_mm3, rel=0.15)
        assert set(np.unique(case.label).tolist()) == {0, 1}


def test_pancreas_crop_margin_in_mm(tmp_path: Path) -> None:
    write_pancreas_raw(tmp_path / "raw", n_cases=1, shape=(48, 44, 14))
    prepare_pancreas_raw(tmp_path / "raw", tmp_path / "P", margin_mm=3.0, log=lambda _: None)
    case = H5Dataset(tmp_path / "P").load("PANCREAS_0001")
    for axis, (lo, hi) in enumerate(_bbox(case.label)):
        assert lo == 3 and case.label.shape[axis] - hi == 3, axis


def test_pancreas_missing_slice_and_misplaced_label_are_refused(tmp_path: Path) -> None:
    write_pancreas_raw(tmp_path / "raw", n_cases=1)
    label_path = tmp_path / "raw" / "TCIA_pancreas_labels-02-05-2017" / "label0001.nii.gz"
    label = nib.load(str(label_path))
    shifted = label.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(label_path))
    with pytest.raises(CrlnError, match=r"label0001.nii.gz: its grid is .* mm away from the image's"):
        prepare_pancreas_raw(tmp_path / "raw", tmp_path / "P", log=lambda _: None)
    slices = sorted((tmp_path / "raw" / "Pancreas-CT").rglob("*.dcm"), key=lambda p: read_z(p))
    slices[len(slices) // 2].unlink()
    with pytest.raises(CrlnError, match=r"slice spacing varies .* \(is a slice missing\?\)"):
        prepare_pancreas_raw(tmp_path / "raw", tmp_path / "P2", log=lambda _: None)


def read_z(path: Path) -> float:
    import pydicom

    return float(pydicom.dcmread(str(path), stop_before_pixels=True).ImagePositionPatient[2])


def test_pancreas_voxel_label_grid_ignores_a_wrong_affine(tmp_path: Path) -> None:
    truth = write_pancreas_raw(tmp_path / "raw", n_cases=1)["PANCREAS_0001"]
    prepare_pancreas_raw(tmp_path / "raw", tmp_path / "affine", log=lambda _: None)
    label_path = tmp_path / "raw" / "TCIA_pancreas_labels-02-05-2017" / "label0001.nii.gz"
    # the CT's own voxel order, but a header that says nothing true about it
    nib.save(nib.Nifti1Image(truth["pancreas"].astype(np.uint8), np.eye(4)), str(label_path))
    with pytest.raises(CrlnError, match="--label-grid voxel"):
        prepare_pancreas_raw(tmp_path / "raw", tmp_path / "refused", log=lambda _: None)
    prepare_pancreas_raw(tmp_path / "raw", tmp_path / "voxel", label_grid="voxel", log=lambda _: None)
    a = H5Dataset(tmp_path / "affine").load("PANCREAS_0001")
    b = H5Dataset(tmp_path / "voxel").load("PANCREAS_0001")
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.image, b.image)


# --- BraTS19 (NIfTI) ----------------------------------------------------------------------------


def test_brats_flair_brain_crop_zscore_and_whole_tumour(tmp_path: Path) -> None:
    truth = write_brats_raw(tmp_path / "raw", n_cases=5)
    dst = tmp_path / "BraTS"
    summary = prepare_brats_raw(tmp_path / "raw", dst, log=lambda _: None)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1}
    lists = _lists(dst, ".txt", ["train", "val", "test"])
    assert sorted(itertools.chain(*lists.values())) == sorted(truth)
    manifest = _manifest(dst)
    dataset = H5Dataset(dst)
    for cid, info in truth.items():
        assert dataset.path(cid) == dst / "data" / f"{cid}.h5"
        case, record = dataset.load(cid), manifest["cases"][cid]
        brain_box = tuple(slice(lo, hi) for lo, hi in _bbox(info["flair"] > 0))
        assert record["crop"] == [[s.start, s.stop] for s in brain_box]
        np.testing.assert_array_equal(case.label, (info["seg"][brain_box] > 0).astype(np.uint8))
        assert record["source_labels"] == [0, 1, 2, 4]
        brain = info["flair"][brain_box] > 0
        assert case.image[brain].mean() == pytest.approx(0.0, abs=1e-4)
        assert case.image[brain].std() == pytest.approx(1.0, abs=1e-4)
        assert record["clip_value"] < BRATS_OUTLIER  # the outlier voxel is clipped
        assert case.image.max() == pytest.approx(
            (record["clip_value"] - record["intensity_mean"]) / record["intensity_std"]
        )


def test_brats_needs_the_label_beside_flair(tmp_path: Path) -> None:
    truth = write_brats_raw(tmp_path / "raw", n_cases=1)
    (seg,) = (tmp_path / "raw").rglob("*_seg.nii.gz")
    seg.unlink()
    with pytest.raises(CrlnError, match=rf"{next(iter(truth))}_seg.nii.gz: file not found"):
        prepare_brats_raw(tmp_path / "raw", tmp_path / "B")


# --- lists, resume, options ---------------------------------------------------------------------


def test_split_dir_gives_the_field_lists(tmp_path: Path) -> None:
    truth = sorted(write_brats_raw(tmp_path / "raw", n_cases=4))
    splits = tmp_path / "splits"
    splits.mkdir()
    wanted = {"train": truth[:2], "val": truth[2:3], "test": truth[3:]}
    for name, ids in wanted.items():
        (splits / f"{name}.txt").write_text("".join(f"{c}\n" for c in ids))
    prepare_brats_raw(tmp_path / "raw", tmp_path / "B", split_dir=splits, log=lambda _: None)
    assert _lists(tmp_path / "B", ".txt", list(wanted)) == wanted
    (splits / "test.txt").write_text("BraTS19_NOT_THERE_1\n")
    with pytest.raises(CrlnError, match=r"test: 1 ids not found in the raw data: BraTS19_NOT_THERE_1"):
        prepare_brats_raw(tmp_path / "raw", tmp_path / "B2", split_dir=splits, log=lambda _: None)


def test_resume_skips_written_cases_and_refuses_other_options(tmp_path: Path) -> None:
    write_la_raw(tmp_path / "raw", n_cases=3)
    first = prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "LA").rglob("*.h5")}
    again = prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)
    assert first["written"] == 3 and again["written"] == 0 and again["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "LA").rglob("*.h5")} == mtimes
    with pytest.raises(CrlnError, match=r"prepare\.json: written by another dataset or other options"):
        prepare_la_raw(tmp_path / "raw", tmp_path / "LA", margin=3, log=lambda _: None)
    with pytest.raises(CrlnError, match="destination is the source or inside it"):
        prepare_la_raw(tmp_path / "raw", tmp_path / "raw" / "out")


def test_an_interrupted_run_resumes_after_the_last_written_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crln.data.prepare_raw as prepare_raw

    write_la_raw(tmp_path / "raw", n_cases=3)
    original, calls = prepare_raw.read_nrrd, {"n": 0}

    def interrupted(path: Path):
        calls["n"] += 1
        if calls["n"] == 5:  # two files per case: stop while reading the third case
            raise KeyboardInterrupt
        return original(path)

    monkeypatch.setattr(prepare_raw, "read_nrrd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)
    assert len(_manifest(tmp_path / "LA")["cases"]) == 2
    monkeypatch.setattr(prepare_raw, "read_nrrd", original)
    resumed = prepare_la_raw(tmp_path / "raw", tmp_path / "LA", log=lambda _: None)
    assert (resumed["written"], resumed["skipped"]) == (1, 2) and len(_manifest(tmp_path / "LA")["cases"]) == 3
