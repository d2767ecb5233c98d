"""Compact dataset copy: bit-exact round trip, float32 fallback, restart, bad cases, parts, merge, and
training/evaluation reading the compact copy exactly like the h5 copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.data.case import Case
from crln.data.compact import (
    MANIFEST_NAME,
    CompactDataset,
    compact_h5_dataset,
    decode_image,
    encode_image,
    read_compact_case,
    read_manifest,
    write_compact_case,
)
from crln.data.h5 import H5Dataset, read_h5_case, write_h5_case
from crln.data.phantom import make_phantom
from crln.data.sources import open_dataset_root
from crln.engine.checkpoint import load_checkpoint
from crln.errors import CrlnError

QUANTISATION_LEVELS = 190  # about the number of distinct values of a real LA volume
SHAPE = (40, 40, 32)
N_TRAIN, N_TEST = 6, 2


def _bits(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image, dtype=np.float32).view(np.uint32)


def _quantised(image: np.ndarray, levels: int = QUANTISATION_LEVELS) -> np.ndarray:
    """A z-scored 8-bit-like volume: at most ``levels`` distinct float32 values, like the field's LA files."""
    low, high = float(image.min()), float(image.max())
    steps = np.round((image - low) / (high - low) * (levels - 1))
    return ((steps - steps.mean()) / steps.std()).astype(np.float32)


def _write_dataset(root: Path, *, fallback_case: int | None = N_TRAIN - 1) -> list[str]:
    """LA-layout h5 dataset of phantoms; every image quantised except ``fallback_case`` (continuous values)."""
    ids = [f"CASE{i:02d}" for i in range(N_TRAIN + N_TEST)]
    for i, cid in enumerate(ids):
        case = make_phantom(100 + i, SHAPE)
        image = case.image if i == fallback_case else _quantised(case.image)
        write_h5_case(root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5", image, case.label)
    (root / "train.list").write_text("".join(f"{c}\n" for c in ids[:N_TRAIN]))
    (root / "test.list").write_text("".join(f"{c}\n" for c in ids[N_TRAIN:]))
    return ids


@pytest.fixture(scope="module")
def h5_and_compact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compact")
    h5_root, compact_root = root / "LA", root / "LA_compact"
    _write_dataset(h5_root)
    assert main(["data", "compact", "--src", str(h5_root), "--dst", str(compact_root), "--quiet"]) == 0
    return h5_root, compact_root


# ----------------------------------------------------------------------------------------------------------
# one volume


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_indexed_round_trip_is_bit_exact_for_awkward_values(codec: str) -> None:
    rng = np.random.default_rng(0)
    special = np.array([-0.0, 0.0, np.finfo(np.float32).tiny / 4, -np.finfo(np.float32).max, 1e-30, 3.5], np.float32)
    table = np.concatenate([special, rng.normal(size=250).astype(np.float32)])  # 256 distinct bit patterns
    image = table[rng.integers(0, table.size, size=(17, 13, 9))]
    image[0, 0, :2] = [-0.0, 0.0]  # both zeros present, distinguished by their sign bit
    header, arrays = encode_image(image, codec)
    assert header["encoding"] == "uint8_table" and header["n_values"] == np.unique(_bits(image)).size
    back = decode_image(header, arrays)
    assert back.dtype == np.float32 and back.shape == image.shape
    assert np.array_equal(_bits(back), _bits(image))
    assert np.signbit(back[0, 0, 0]) and not np.signbit(back[0, 0, 1])


def test_nan_payloads_survive_the_encoding_bit_for_bit() -> None:
    image = np.zeros((4, 5, 6), np.float32)
    bits = image.view(np.uint32)
    bits[0, 0, 0], bits[1, 1, 1] = 0x7FC00001, 0xFFC00002  # two different NaNs
    back = decode_image(*encode_image(image))
    assert np.array_equal(_bits(back), _bits(image))


def test_more_than_256_values_fall_back_to_lossless_float32() -> None:
    rng = np.random.default_rng(1)
    at_limit = rng.permutation(np.repeat(np.linspace(-2, 2, 256, dtype=np.float32), 8)).reshape(16, 16, 8)
    over = at_limit.copy()
    over[0, 0, 0] = np.float32(7.25)  # the 257th distinct value
    assert encode_image(at_limit)[0]["encoding"] == "uint8_table"
    smooth = np.cumsum(rng.normal(size=(16, 16, 8)), axis=0).astype(np.float32)  # continuous values
    predictors = set()
    for image in (over, smooth):
        header, arrays = encode_image(image)
        assert header["encoding"] == "float32" and "table" not in arrays
        assert np.array_equal(_bits(decode_image(header, arrays)), _bits(image))
        predictors.add(header["predictor"])
    assert predictors == {"none", "byte_planes"}  # whichever layout compresses better is kept


def test_multichannel_volume_round_trips(tmp_path: Path) -> None:
    image = _quantised(np.random.default_rng(2).normal(size=(2, 12, 10, 8)), levels=50)
    label = (image[0] > 0).astype(np.uint8)
    write_compact_case(tmp_path / "c.npz", Case("c", image, label))
    case = read_compact_case(tmp_path / "c.npz")
    assert case.case_id == "c" and np.array_equal(_bits(case.image), _bits(image))
    assert np.array_equal(case.label, label) and case.label.dtype == np.uint8


def test_truncated_case_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    write_compact_case(path, Case("c", _quantised(np.random.default_rng(3).normal(size=(8, 8, 8)))))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CrlnError, match=r"c\.npz: unreadable compact case"):
        read_compact_case(path, with_label=False)
    write_compact_case(path, Case("c", np.zeros((4, 4, 4), np.float32)))
    with pytest.raises(CrlnError, match="has no label"):
        read_compact_case(path)


def test_real_la_volumes_round_trip_bit_for_bit(la_root: Path, tmp_path: Path) -> None:
    dataset = H5Dataset(la_root, cache=False)
    for cid in dataset.ids("train")[:2]:
        source = read_h5_case(dataset.path(cid), cid)
        header = write_compact_case(tmp_path / f"{cid}.npz", source)
        back = read_compact_case(tmp_path / f"{cid}.npz", cid)
        assert header["encoding"] == "uint8_table" and header["n_values"] <= 256
        assert np.isfinite(back.image).all()
        assert np.array_equal(_bits(back.image), _bits(source.image))
        assert np.array_equal(back.label, source.label)
        # the point of the exercise: well under the float32 h5 file
        assert (tmp_path / f"{cid}.npz").stat().st_size < 0.7 * dataset.path(cid).stat().st_size


# ----------------------------------------------------------------------------------------------------------
# a dataset


def test_compact_copy_reads_like_the_h5_copy(h5_and_compact: tuple[Path, Path]) -> None:
    h5_root, compact_root = h5_and_compact
    h5, compact = open_dataset_root(h5_root, "h5"), open_dataset_root(compact_root, "h5")
    assert isinstance(compact, CompactDataset) and isinstance(open_dataset_root(compact_root), CompactDataset)
    for split in ("train", "test"):
        assert compact.ids(split) == h5.ids(split)
    ids = h5.ids("train") + h5.ids("test")
    for a, b in zip(h5.load_many(ids), compact.load_many(ids), strict=True):
        assert a.case_id == b.case_id and a.image.shape == b.image.shape
        assert np.array_equal(_bits(a.image), _bits(b.image)) and np.isfinite(b.image).all()
        assert np.array_equal(a.label, b.label) and b.label.dtype == np.uint8
        assert a.spacing == b.spacing and np.array_equal(a.affine, b.affine)
    manifest = read_manifest(compact_root)
    encodings = [manifest["cases"][cid]["encoding"] for cid in ids]
    assert manifest["complete"] and encodings.count("float32") == 1 and encodings.count("uint8_table") == len(ids) - 1
    assert compact.load(ids[0], with_label=False).label is None


def test_training_and_evaluation_match_on_both_copies(h5_and_compact: tuple[Path, Path], tmp_path: Path) -> None:
    from crln.engine.trainer import train
    from crln.evaluation import evaluate

    summaries, weights = [], []
    for name, root in zip(("h5", "compact"), h5_and_compact, strict=True):
        overrides = tiny_overrides(
            root, tmp_path / name, **{"train.iterations": 2, "data.labeled": 2, "data.validation": 0}
        )
        result = train(load_config("demo", [*overrides, "method.name=mean_teacher"]), progress=False)
        weights.append(load_checkpoint(result.run_dir / "checkpoint_final.pt")["method_state"])
        out = evaluate(result.run_dir, device="cpu", progress=False)
        summaries.append(json.loads((out["out_dir"] / "summary.json").read_text())["metrics"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert summaries[0] == summaries[1]


def test_restart_skips_finished_cases_and_redoes_changed_ones(tmp_path: Path) -> None:
    src, dst = tmp_path / "LA", tmp_path / "out"
    ids = _write_dataset(src, fallback_case=None)
    assert main(["data", "compact", "--src", str(src), "--dst", str(dst), "--quiet"]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in (dst / "cases").iterdir()}
    (dst / "cases" / f"{ids[1]}.npz").unlink()  # as if killed before this case
    case = make_phantom(7, SHAPE)  # the source of another case changes
    write_h5_case(src / "2018LA_Seg_Training Set" / ids[2] / "mri_norm2.h5", _quantised(case.image), case.label)
    summary = compact_h5_dataset(src, dst)
    assert (summary.written, summary.skipped) == (2, len(ids) - 2)
    unchanged = [p for p in mtimes if p.stem not in ids[1:3]]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in unchanged)
    assert np.array_equal(CompactDataset(dst).load(ids[2]).label, case.label)
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]
    with pytest.raises(CrlnError, match="--codec zlib, expected lzma"):
        compact_h5_dataset(src, dst, codec="lzma")


def test_bad_cases_are_reported_one_line_each_and_the_rest_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "LA", tmp_path / "out"
    ids = _write_dataset(src, fallback_case=None)
    nan_image = _quantised(make_phantom(1, SHAPE).image)
    nan_image[3, 3, 3] = np.nan
    write_h5_case(src / "2018LA_Seg_Training Set" / ids[0] / "mri_norm2.h5", nan_image, np.zeros(SHAPE, np.uint8))
    (src / "2018LA_Seg_Training Set" / ids[4] / "mri_norm2.h5").write_bytes(b"not an hdf5 file")
    code = main(["data", "compact", "--src", str(src), "--dst", str(dst), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "2 of 8 cases failed" in err and "rerun to finish" in err
    error_lines = [line for line in out.splitlines() if "error:" in line]
    assert len(error_lines) == 2
    assert ids[0] in error_lines[0] and "NaN" in error_lines[0]
    assert ids[4] in error_lines[1] and "HDF5" in error_lines[1]
    manifest = read_manifest(dst)
    assert not manifest["complete"] and sorted(manifest["cases"]) == sorted(set(ids) - {ids[0], ids[4]})
    with pytest.raises(CrlnError, match=rf"{MANIFEST_NAME}: case '{ids[0]}' is not in this compact copy"):
        CompactDataset(dst).load(ids[0])


def test_parts_fit_the_budget_and_merge_back(h5_and_compact: tuple[Path, Path], tmp_path: Path) -> None:
    h5_root, _ = h5_and_compact
    out = tmp_path / "out"
    largest = max(p.stat().st_size for p in h5_and_compact[1].joinpath("cases").iterdir())  # the float32 case
    with pytest.raises(CrlnError, match="alone takes"):
        compact_h5_dataset(h5_root, out, max_part_mib=largest / 2**20)
    budget_mib = (largest + 70 * 1024) / 2**20  # the largest case, the lists and the manifest's reserve
    assert main(["data", "compact", "--src", str(h5_root), "--dst", str(out), "--max-part-mib", str(budget_mib)]) == 0
    parts = sorted(out.glob("part*"))
    assert len(parts) >= 3
    train_ids, test_ids = H5Dataset(h5_root).ids("train"), H5Dataset(h5_root).ids("test")
    seen: list[str] = []
    for part in parts:
        assert sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) <= budget_mib * 2**20
        manifest = read_manifest(part)
        ids = list(manifest["cases"])
        assert set(ids) <= set(train_ids) or set(ids) <= set(test_ids)  # a part never mixes lists
        assert (part / "train.list").is_file() and (part / "test.list").is_file()
        seen += ids
    assert seen == train_ids + test_ids  # in list order: part1 holds the labelled cases
    with pytest.raises(CrlnError, match=f"part 1 of {len(parts)}: merge all parts with crln data merge"):
        CompactDataset(parts[0]).load(test_ids[0])

    merged = tmp_path / "merged"
    assert main(["data", "merge", "--dst", str(merged), *map(str, parts[:-1])]) == 0
    assert not read_manifest(merged)["complete"]
    assert main(["data", "merge", "--dst", str(merged), str(parts[-1])]) == 0  # a later call adds the rest
    assert read_manifest(merged)["complete"]
    a, b = CompactDataset(out), CompactDataset(merged)
    for cid in train_ids + test_ids:
        assert np.array_equal(_bits(a.load(cid).image), _bits(b.load(cid).image))


def test_merge_refuses_mismatched_copies(h5_and_compact: tuple[Path, Path], tmp_path: Path) -> None:
    h5_root, compact_root = h5_and_compact
    other = tmp_path / "lzma"
    from crln.data.compact import merge_compact

    compact_h5_dataset(h5_root, other, codec="lzma")
    with pytest.raises(CrlnError, match="codec 'lzma', expected 'zlib'"):
        merge_compact([compact_root, other], tmp_path / "m")
    with pytest.raises(CrlnError, match="not found, expected a compact dataset folder"):
        merge_compact([h5_root], tmp_path / "m")
    with pytest.raises(CrlnError, match="already a compact copy"):
        compact_h5_dataset(compact_root, tmp_path / "again")


def test_scale_and_preparation_records_travel_with_the_copy_its_parts_and_merges(tmp_path: Path) -> None:
    from crln.data.compact import merge_compact
    from crln.data.prepare import PREPARE_MANIFEST, prepare_h5_dataset, recorded_scale

    src, half, out = tmp_path / "LA", tmp_path / "LA_0.5", tmp_path / "LA_0.5_compact"
    _write_dataset(src, fallback_case=None)
    prepare_h5_dataset(src, half, scale=0.5)
    compact_h5_dataset(half, out)
    largest = max(p.stat().st_size for p in (out / "cases").iterdir())
    parts = compact_h5_dataset(half, out, max_part_mib=(largest + 72 * 1024) / 2**20).parts
    assert len(parts) >= 2
    carried = tmp_path / "carried"  # a part carried alone, as to a lent GPU machine, then merged there
    for part in parts:
        shutil.copytree(part, carried / part.name)
    merged = tmp_path / "merged"
    merge_compact(sorted(carried.iterdir()), merged)
    for root in (out, *sorted(carried.iterdir()), merged):
        assert recorded_scale(root) == 0.5, root
        assert (root / PREPARE_MANIFEST).read_bytes() == (half / PREPARE_MANIFEST).read_bytes(), root


def test_a_destination_that_is_a_file_or_another_folder_is_refused_in_one_line(
    h5_and_compact: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5_root, compact_root = h5_and_compact
    other = tmp_path / "other"  # e.g. another dataset: its case lists must not be overwritten
    other.mkdir()
    (other / "train.list").write_text("mine\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv in (
        ["data", "compact", "--src", str(h5_root), "--dst", str(other)],
        ["data", "merge", str(compact_root), "--dst", str(other)],
        ["data", "compact", "--src", str(h5_root), "--dst", str(a_file)],
        ["data", "merge", str(compact_root), "--dst", str(a_file)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("crln: error: --dst "), err
    assert sorted(p.name for p in other.iterdir()) == ["train.list"] and (other / "train.list").read_text() == "mine\n"
    assert a_file.read_text() == "x"


def test_a_copy_or_merge_killed_before_its_first_case_is_finished_by_a_rerun(
    h5_and_compact: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crln.data.compact as compact

    h5_root, compact_root = h5_and_compact

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compact, "write_compact_case", killed)
    monkeypatch.setattr(compact, "_copy_file", killed)  # also before the case lists
    for run in (
        lambda: compact_h5_dataset(h5_root, tmp_path / "c"),
        lambda: compact.merge_compact([compact_root], tmp_path / "m"),
    ):
        with pytest.raises(KeyboardInterrupt):
            run()
    monkeypatch.undo()
    assert compact_h5_dataset(h5_root, tmp_path / "c").written == N_TRAIN + N_TEST
    assert compact.merge_compact([compact_root], tmp_path / "m").written == N_TRAIN + N_TEST
    leftover = tmp_path / "c" / "cases" / ".CASE00.npz.k1ll3d.tmp"  # what a SIGKILL inside a case write leaves
    leftover.write_bytes(b"half a case")
    compact_h5_dataset(h5_root, tmp_path / "c")
    assert not leftover.exists()
    for root in (tmp_path / "c", tmp_path / "m"):
        assert read_manifest(root)["complete"] and (root / "test.list").is_file()


def test_merge_refuses_parts_of_copies_of_different_sources(h5_and_compact: tuple[Path, Path], tmp_path: Path) -> None:
    from crln.data.compact import merge_compact, write_parts
    from crln.data.prepare import prepare_h5_dataset

    h5_root, _ = h5_and_compact
    half = tmp_path / "LA_0.5"  # the same case lists, other volumes
    prepare_h5_dataset(h5_root, half, scale=0.5)
    full_parts = write_parts(compact_h5_dataset(h5_root, tmp_path / "full").dst, 1.0)
    half_parts = write_parts(compact_h5_dataset(half, tmp_path / "half").dst, 1.0)
    with pytest.raises(CrlnError, match=rf"part1/{MANIFEST_NAME}: a copy of {half}, expected .* of {h5_root}"):
        merge_compact([full_parts[0], half_parts[0]], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    merge_compact([full_parts[0]], tmp_path / "m")
    with pytest.raises(CrlnError, match=f"a copy of {half}"):  # nor into a folder merged from the other
        merge_compact([half_parts[-1]], tmp_path / "m")
