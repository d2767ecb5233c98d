"""h5 reader, case lists, locating cases in the field's layouts, H5Dataset cache."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from crln.data import H5Dataset, clear_h5_cache, locate_case, read_case_list, read_h5_case, write_h5_case
from crln.errors import CrlnError

REPO = Path(__file__).resolve().parents[1]
LA_ROOT = REPO.parent / "shared" / "data" / "LA"


def _vol(shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    return image, label


def _write_list(path: Path, ids) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def la_root() -> Path:
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"LA data not found at {LA_ROOT}")
    return LA_ROOT


def test_read_real_la_cases(la_root: Path) -> None:
    ds = H5Dataset(la_root)
    train = ds.ids("train")
    assert len(train) >= 3 and len(set(train)) == len(train)
    assert len(ds.ids("test")) >= 1
    for cid in train[:3]:
        path = ds.path(cid)
        assert path.name == "mri_norm2.h5" and path.parent.name == cid
        case = ds.load(cid)
        assert case.case_id == cid
        assert case.image.ndim == 3 and case.image.dtype == np.float32
        assert case.label is not None and case.label.dtype == np.uint8
        assert case.label.shape == case.image.shape
        assert set(np.unique(case.label).tolist()) <= {0, 1}
        assert np.isfinite(case.image).all()
        np.testing.assert_array_equal(case.affine, np.eye(4))


def test_pancreas_layout(tmp_path: Path) -> None:
    # MC-Net / BCP Pancreas-CT: data/<id>_norm.h5 with train.list / test.list
    ids = ["image0001", "image0002", "image0003"]
    for i, cid in enumerate(ids):
        write_h5_case(tmp_path / "data" / f"{cid}_norm.h5", *_vol(seed=i))
    _write_list(tmp_path / "train.list", ids[:2])
    _write_list(tmp_path / "test.list", ids[2:])
    ds = H5Dataset(tmp_path)
    assert ds.ids("train") == ids[:2] and ds.ids("test") == ids[2:]
    assert ds.path("image0003") == tmp_path / "data" / "image0003_norm.h5"
    case = ds.load("image0001")
    np.testing.assert_array_equal(case.image, _vol(seed=0)[0])
    np.testing.assert_array_equal(case.label, _vol(seed=0)[1])


def test_pancreas_folder_layout(tmp_path: Path) -> None:
    # <id>/<single>.h5 variant
    write_h5_case(tmp_path / "Pancreas_h5" / "p01" / "p01_norm.h5", *_vol())
    assert locate_case(tmp_path, "p01").name == "p01_norm.h5"


def test_brats_layout(tmp_path: Path) -> None:
    # SSL4MIS / TraCoCo BraTS19: data/<id>.h5 with train.txt / val.txt / test.txt
    ids = ["BraTS19_2013_0_1", "BraTS19_2013_1_1", "BraTS19_CBICA_AAB_1"]
    for i, cid in enumerate(ids):
        write_h5_case(tmp_path / "data" / f"{cid}.h5", *_vol(seed=i))
    for split, part in (("train", ids[:1]), ("val", ids[1:2]), ("test", ids[2:])):
        _write_list(tmp_path / f"{split}.txt", part)
    ds = H5Dataset(tmp_path)
    assert ds.splits() == ["test", "train", "val"]
    cases = ds.load_many(ds.ids("train") + ds.ids("val") + ds.ids("test"))
    assert [c.case_id for c in cases] == ids
    assert all(c.label is not None and c.label.shape == (12, 10, 8) for c in cases)


def test_locate_not_found_and_new_files(tmp_path: Path) -> None:
    write_h5_case(tmp_path / "data" / "a.h5", *_vol())
    with pytest.raises(CrlnError, match=r"'b' not found.*layouts tried"):
        locate_case(tmp_path, "b")
    write_h5_case(tmp_path / "data" / "b.h5", *_vol())  # added after the index was built
    assert locate_case(tmp_path, "b").name == "b.h5"
    with pytest.raises(CrlnError, match="path separator"):
        locate_case(tmp_path, "../a")


def test_locate_ambiguous(tmp_path: Path) -> None:
    write_h5_case(tmp_path / "x" / "a.h5", *_vol())
    write_h5_case(tmp_path / "y" / "a.h5", *_vol())
    with pytest.raises(CrlnError, match="ambiguous"):
        locate_case(tmp_path, "a")


def test_cache_decodes_once(tmp_path: Path) -> None:
    clear_h5_cache()
    write_h5_case(tmp_path / "data" / "a.h5", *_vol())
    ds = H5Dataset(tmp_path)
    c1, c2 = ds.load("a"), ds.load("a")
    assert c1.image is c2.image and not c1.image.flags.writeable
    unl = ds.load("a", with_label=False)
    assert unl.label is None and unl.image is c1.image


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    with pytest.raises(TypeError):
        write_h5_case(path, np.zeros((2, 2, 2)), label=object())  # fails mid-write
    assert list(tmp_path.iterdir()) == []


def test_read_without_label(tmp_path: Path) -> None:
    image, _ = _vol()
    write_h5_case(tmp_path / "u.h5", image)
    case = read_h5_case(tmp_path / "u.h5", with_label=False)
    assert case.label is None and case.case_id == "u"
    with pytest.raises(CrlnError, match=r"u\.h5: missing key 'label', found keys \['image'\]"):
        read_h5_case(tmp_path / "u.h5")


# ---------------------------------------------------------------- bad inputs: every one names the file or key


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CrlnError, match=r"nope\.h5: file not found"):
        read_h5_case(tmp_path / "nope.h5")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(CrlnError, match=r"empty\.h5: file is empty"):
        read_h5_case(tmp_path / "empty.h5")


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "text.h5").write_text("not an hdf5 file\n")
    with pytest.raises(CrlnError, match=r"text\.h5: not an HDF5 file"):
        read_h5_case(tmp_path / "text.h5")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "trunc.h5"
    write_h5_case(path, *_vol((32, 32, 16)), compression=None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CrlnError, match=r"trunc\.h5: .*(unreadable|cannot be read)"):
        read_h5_case(path)


def test_missing_image_key(tmp_path: Path) -> None:
    path = tmp_path / "nokey.h5"
    with h5py.File(path, "w") as f:
        f["img"] = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(CrlnError, match=r"nokey\.h5: missing key 'image', found keys \['img'\]"):
        read_h5_case(path)


@pytest.mark.parametrize("shape", [(8, 8), (2, 8, 8, 8)])
def test_wrong_ndim(tmp_path: Path, shape) -> None:
    path = tmp_path / "nd.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros(shape, np.float32)
        f["label"] = np.zeros(shape[-3:] if len(shape) == 4 else shape, np.uint8)
    with pytest.raises(CrlnError, match=r"nd\.h5: key 'image' has shape .* expected 3D"):
        read_h5_case(path)


def test_four_d_allowed_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "mc.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((2, 8, 8, 8), np.float32)
        f["label"] = np.zeros((8, 8, 8), np.uint8)
    assert read_h5_case(path, allow_channels=True).image.shape == (2, 8, 8, 8)


def test_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "mm.h5"
    image, _ = _vol()
    write_h5_case(path, image, np.zeros((12, 10, 7), np.uint8))
    with pytest.raises(CrlnError, match=r"mm\.h5: key 'label' has shape \(12, 10, 7\)"):
        read_h5_case(path)


def test_list_duplicates(tmp_path: Path) -> None:
    (tmp_path / "train.list").write_text("a\nb\n\na\n")
    with pytest.raises(CrlnError, match=r"train\.list: duplicate ids 'a' \(lines 1 and 4\)"):
        read_case_list(tmp_path, "train")


@pytest.mark.parametrize("bad", ["../escape", "sub/dir", "..", "a\\b"])
def test_list_path_escape(tmp_path: Path, bad: str) -> None:
    (tmp_path / "train.txt").write_text(f"a\n{bad}\n")
    with pytest.raises(CrlnError, match=r"train\.txt: line 2"):
        read_case_list(tmp_path, "train")


def test_list_missing(tmp_path: Path) -> None:
    with pytest.raises(CrlnError, match=r"split 'train'.*train\.list"):
        read_case_list(tmp_path, "train")


def test_list_blank_lines_and_whitespace(tmp_path: Path) -> None:
    (tmp_path / "test.list").write_text("  a \n\n b\r\n\n")
    assert read_case_list(tmp_path, "test") == ["a", "b"]


def test_case_cache_is_bounded_with_lru_eviction(tmp_path: Path) -> None:
    from crln.data.h5 import H5Dataset, clear_h5_cache, h5_cache_bytes, set_h5_cache_limit
    from crln.data.phantom import write_phantom_h5_dataset

    root = write_phantom_h5_dataset(tmp_path / "ph", n_train=4, n_test=0, shape=(32, 32, 16), seed=0)
    per_case = 32 * 32 * 16 * (4 + 1)  # float32 image + uint8 label
    clear_h5_cache()
    set_h5_cache_limit(2 * per_case)
    try:
        ds = H5Dataset(root)
        ids = ds.ids("train")
        first = [ds.load(i).image.copy() for i in ids]
        assert h5_cache_bytes() <= 2 * per_case  # only the two most recent cases stay
        again = [ds.load(i).image for i in ids]  # evicted ones are decoded again, identically
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
    finally:
        set_h5_cache_limit(8 * 2**30)
        clear_h5_cache()
