"""prepare_h5_dataset: downsampled copy, same layout, lists copied, resumable, refuses dst in src."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crln.data import H5Dataset, prepare_h5_dataset, read_h5_case, resample_image, resample_label, write_h5_case
from crln.errors import CrlnError


def _la_like(root: Path, n: int = 3) -> list[str]:
    ids = [f"ID{i:02d}" for i in range(n)]
    for i, cid in enumerate(ids):
        rng = np.random.default_rng(i)
        label = np.zeros((20, 17, 10), np.uint8)
        label[4:14, 3:12, 2:8] = 1
        label[6:9, 5:8, 3:5] = 2
        image = (label + rng.normal(0, 0.1, label.shape)).astype(np.float32)
        write_h5_case(root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5", image, label)
    (root / "train.list").write_text("".join(f"{c}\n" for c in ids[:2]))
    (root / "test.list").write_text(f"{ids[2]}\n")
    return ids


def test_prepare_halves_and_resumes(tmp_path: Path) -> None:
    src, dst = tmp_path / "LA", tmp_path / "LA_half"
    ids = _la_like(src)
    logs: list[str] = []
    summary = prepare_h5_dataset(src, dst, log=logs.append)
    assert summary["cases"] == 3 and summary["written"] == 3 and summary["bytes"] > 0
    assert logs and "3/3" in logs[-1]
    assert (dst / "train.list").read_text() == (src / "train.list").read_text()
    assert (dst / "test.list").read_text() == (src / "test.list").read_text()
    ds = H5Dataset(dst)
    for cid in ids:
        assert ds.path(cid) == dst / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5"
        case = ds.load(cid)
        assert case.image.shape == (10, 8, 5)  # round(20 * .5), round(17 * .5) = 8 (banker's), 5
        assert set(np.unique(case.label).tolist()) <= {0, 1, 2} and 1 in case.label
    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*.h5")}
    again = prepare_h5_dataset(src, dst, log=logs.append)
    assert again["written"] == 0 and again["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.h5")} == mtimes
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]


def test_prepare_nearest_trilinear_and_splits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ids = _la_like(src)
    out = prepare_h5_dataset(
        src,
        tmp_path / "q",
        scale=0.25,
        image_mode="trilinear",
        label_mode="nearest",
        splits=["test"],
        log=print,
    )
    assert out["cases"] == 1 and (tmp_path / "q" / "test.list").is_file()
    assert not (tmp_path / "q" / "train.list").exists()
    # the modes asked for are the ones applied, not the defaults (area, majority)
    # read_h5_case, as prepare does: the dataset's cache hands out read-only arrays, which torch warns about
    source = read_h5_case(H5Dataset(src).path(ids[2]), ids[2])
    prepared = read_h5_case(H5Dataset(tmp_path / "q").path(ids[2]), ids[2])
    shape = (5, 4, 2)  # round(20 * .25), round(17 * .25), round(10 * .25) = 2 (banker's)
    assert prepared.image.shape == shape
    np.testing.assert_array_equal(prepared.image, resample_image(source.image, shape, "trilinear"))
    np.testing.assert_array_equal(prepared.label, resample_label(source.label, shape, "nearest"))
    # on this input the defaults give other arrays, so the equalities above tell the modes apart
    assert not np.allclose(resample_image(source.image, shape, "area"), prepared.image)
    assert not np.array_equal(resample_label(source.label, shape, "majority"), prepared.label)


def test_prepare_refuses_dst_in_src(tmp_path: Path) -> None:
    _la_like(tmp_path)
    with pytest.raises(CrlnError, match="destination is the source or inside it"):
        prepare_h5_dataset(tmp_path, tmp_path / "half")
    with pytest.raises(CrlnError, match="destination is the source"):
        prepare_h5_dataset(tmp_path, tmp_path)
    with pytest.raises(CrlnError, match="scale = 0"):
        prepare_h5_dataset(tmp_path, tmp_path.parent / "x", scale=0)


def test_resample_majority_and_area() -> None:
    label = np.zeros((4, 4, 4), np.uint8)
    label[:3, :3, :3] = 1  # a 2x2x2 block with 7 of 8 voxels set -> 1, a block with 1 of 8 -> 0
    out = resample_label(label, (2, 2, 2))
    assert out[0, 0, 0] == 1 and out[1, 1, 1] == 0 and out.dtype == np.uint8
    image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert resample_image(image, (1, 1, 1))[0, 0, 0] == pytest.approx(3.5)
    two = resample_image(np.stack([image, image * 2]), (1, 1, 1))
    assert two.shape == (2, 1, 1, 1) and two[1, 0, 0, 0] == pytest.approx(7.0)
