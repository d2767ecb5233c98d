"""Inference the way users run it (issue #22, section 4), as a matrix of inputs and options.

``crln predict`` on folders, output folders checked before any work, no silent overwrite, all of a
case's outputs or none, NIfTI headers kept, ``--stride`` / ``--sw-batch-size``, strides adapted to the
data's scale, the weights-only ``model_final.pt``, and messages that name the right flag or file.
One tiny run (2 iterations, one validation case) stands in for a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import crln.predictor
from conftest import assert_user_error, tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.data.nifti import NiftiDataset
from crln.data.prepare import SCALE_RECORD, prepare_h5_dataset, recorded_scale
from crln.engine.checkpoint import load_checkpoint
from crln.errors import CrlnError
from crln.evaluation import _scan_groups
from crln.inference import scaled_stride, window_count
from crln.predictor import inference_stride

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(phantom_root, out, **{"train.iterations": 2})
    assert main(["train", "demo", *overrides, "--no-progress"]) == 0
    return out / "phantom" / "supervised__vnet__demo" / "seed1337"


def _scan(path: Path, shape: tuple[int, ...] = SHAPE, codes: int = 1, seed: int = 0) -> np.ndarray:
    """A NIfTI scan with qform and sform codes ``codes`` and a non-trivial affine; returns the affine."""
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    affine[:3, 3] = [4.0, -2.0, 7.0]
    img = nib.Nifti1Image(np.random.default_rng(seed).normal(size=shape).astype(np.float32), affine)
    img.set_qform(affine, code=codes)
    img.set_sform(affine, code=codes)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return affine


def _no_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any sliding-window prediction starts: the check must come before the work."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inference ran before the error")

    monkeypatch.setattr(crln.predictor, "predict_case", refuse)
    monkeypatch.setattr("crln.inference.sliding_window_predict", refuse)


# ----------------------------------------------------------------------------------------------------------
# predict: folders, names, headers, overwrite


def test_predict_a_folder_keeps_headers_and_names_like_nnunet(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scans = tmp_path / "imagesTs"
    affine = _scan(scans / "a_0000.nii.gz")
    _scan(scans / "b.nii.gz", seed=1)
    (scans / "notes.txt").write_text("not a scan")
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(scans), "-o", str(out), "--nnunet-names", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    seg = nib.load(out / "a.nii.gz")
    assert np.allclose(seg.affine, affine)
    assert (int(seg.header["qform_code"]), int(seg.header["sform_code"])) == (1, 1)
    assert seg.get_data_dtype() == np.uint8
    capsys.readouterr()


def test_channel_files_of_one_folder_form_one_case(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "scan_0003.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    groups = dict(_scan_groups([tmp_path]))
    assert [p.name for p in groups["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert [p.name for p in groups["scan_0003"]] == ["scan_0003.nii.gz"]  # no scan_0000 beside it: a case


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d.mkdir(), "folder holds no .nii.gz, .nii, .h5, .hdf5 file"),
        (lambda d: None, "no such file or folder"),
    ],
    ids=["empty folder", "missing"],
)
def test_predict_bad_input_folders(
    make, fragment: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    _no_inference(monkeypatch)
    make(tmp_path / "scans")
    out = tmp_path / "pred"
    assert_user_error(["predict", run, tmp_path / "scans", "-o", out], capsys, "scans", fragment)
    assert not out.exists()


def test_predictions_are_not_silently_overwritten(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "pred"
    argv = ["predict", run, tmp_path / "scan.nii.gz", "-o", out, "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    first = (out / "scan_seg.nii.gz").stat().st_mtime_ns
    with monkeypatch.context() as patch:
        _no_inference(patch)
        assert_user_error(argv, capsys, "scan_seg.nii.gz already exists", "--overwrite")
    assert (out / "scan_seg.nii.gz").stat().st_mtime_ns == first
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------
# output folders that are files: one line, exit 2, before any work


@pytest.mark.parametrize("verb", ["predict", "evaluate", "report", "train --run-dir", "train.output_dir"])
def test_an_output_folder_that_is_a_file(
    verb: str,
    run: Path,
    phantom_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_inference(monkeypatch)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    _scan(tmp_path / "scan.nii.gz")
    argv = {
        "predict": ["predict", run, tmp_path / "scan.nii.gz", "-o", blocker],
        "evaluate": ["evaluate", run, "--out", blocker / "sub"],
        "report": ["report", run, "-o", blocker],
        "train --run-dir": ["train", "demo", *tiny_overrides(phantom_root, tmp_path), "--run-dir", blocker],
        "train.output_dir": ["train", "demo", *tiny_overrides(phantom_root, blocker)],
    }[verb]
    flag = {
        "predict": "-o",
        "evaluate": "--out",
        "report": "-o",
        "train --run-dir": "--run-dir",
        "train.output_dir": "run folder (train.output_dir)",  # the config key, as there is no flag
    }[verb]
    assert_user_error(argv, capsys, flag, str(blocker), "expected a folder to write into")
    assert blocker.read_text() == "a file"


def test_evaluate_on_other_data_writes_its_own_folder(
    run: Path, phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    other = tmp_path / "other_data"
    shutil.copytree(phantom_root, other)
    before = (run / "eval").exists()
    assert main(["evaluate", str(run), "--data", str(other), "--limit", "1", "--device", "cpu"]) == 0
    assert (run / "eval_other_data_test_final" / "summary.json").is_file()
    assert (run / "eval").exists() == before
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------
# preview


def test_preview_of_a_one_slice_volume(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _scan(tmp_path / "thin.nii.gz", shape=(32, 32, 1))
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(tmp_path / "thin.nii.gz"), "-o", str(out), "--preview"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["thin_overlay.png", "thin_seg.nii.gz"]
    capsys.readouterr()


def test_a_failed_preview_leaves_nothing_of_its_case(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise CrlnError("preview failed")

    monkeypatch.setattr("crln.report.figures.plot_slice_overlay", broken)
    _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "pred"
    argv = ["predict", run, tmp_path / "scan.nii.gz", "-o", out, "--preview", "--probabilities"]
    assert_user_error(argv, capsys, "preview failed")
    assert list(out.iterdir()) == []  # no segmentation, no probabilities, no temp file


@pytest.mark.parametrize("with_label", [False, True])
def test_preview_legend_names_ground_truth_only_when_drawn(with_label: bool, monkeypatch, tmp_path: Path) -> None:
    from crln.report import figures

    legends: list[list[str]] = []
    original = figures.save_figure

    def capture(fig, path):
        legends.extend([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend())
        return original(fig, path)

    monkeypatch.setattr(figures, "save_figure", capture)
    volume = np.zeros(SHAPE, np.uint8)
    volume[8:20, 8:20, 8:20] = 1
    label = volume if with_label else None
    figures.plot_slice_overlay(volume.astype(np.float32), label, volume, np.ones(SHAPE), tmp_path / "o.png")
    assert legends == [["ground truth", "prediction"] if with_label else ["prediction"]]


# ----------------------------------------------------------------------------------------------------------
# options and messages


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--limit", "0"], "--limit: expected a positive number of cases, got 0"),
        (["--limit", "-2"], "--limit: expected a positive number of cases, got -2"),
        (["--device", "gpu"], "--device: expected auto, cpu or cuda[:N], got 'gpu'"),
        (["--sw-batch-size", "0"], "--sw-batch-size: expected at least 1"),
        (["--stride", "64,8,8"], "--stride: expected 3 integers between 1 and the patch [32, 32, 32]"),
    ],
)
def test_evaluate_options_name_the_flag(
    extra: list[str], fragment: str, run: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    _no_inference(monkeypatch)
    assert_user_error(["evaluate", run, *extra], capsys, fragment)


@pytest.mark.parametrize(
    ("verb", "extra", "fragment"),
    [
        ("predict", ["--device", "gpu"], "--device: expected auto"),
        ("predict", ["--stride", "0"], "expected three positive integers"),
        ("report", ["--device", "gpu"], "--device: expected auto"),
        ("report", ["--sw-batch-size", "0"], "--sw-batch-size"),
        ("report", ["--stride", "40"], "--stride"),
    ],
)
def test_predict_and_report_options(
    verb: str, extra: list[str], fragment: str, run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    _no_inference(monkeypatch)
    _scan(tmp_path / "scan.nii.gz")
    argv = ["predict", run, tmp_path / "scan.nii.gz", "-o", tmp_path / "p"] if verb == "predict" else ["report", run]
    if "three positive" in fragment:  # an argparse type error: usage and one line, exit 2
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in [*argv, *extra]])
        assert info.value.code == 2 and fragment in capsys.readouterr().err
        return
    assert_user_error([*argv, *extra], capsys, fragment)
    assert not (tmp_path / "p").exists()


def test_checkpoint_messages(tmp_path: Path, run: Path) -> None:
    data = (run / "checkpoint_final.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CrlnError) as info:
        load_checkpoint(tmp_path / "cut.pt")
    message = str(info.value)
    assert "truncated or corrupt" in message and message.endswith(".)"), message  # whole sentences only
    _scan(tmp_path / "scan.nii.gz")
    with pytest.raises(CrlnError, match=r"not a crln checkpoint \(a gzip file, e.g. a .nii.gz scan\)") as info:
        load_checkpoint(tmp_path / "scan.nii.gz")
    assert "refuses to run" not in str(info.value)


@pytest.mark.parametrize(
    ("files", "meta", "fragment"),
    [
        ([], None, "it is empty"),
        (["case_0000.nii"], {"file_ending": ".nii.gz"}, "no image file ending in '.nii.gz'"),
    ],
    ids=["empty imagesTr", "file_ending matches nothing"],
)
def test_empty_training_images_are_said(files: list[str], meta: dict | None, fragment: str, tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    for name in files:
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    if meta is not None:
        (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CrlnError, match="imagesTr") as info:
        NiftiDataset(tmp_path).ids("train")
    assert fragment in str(info.value)
    assert "holds only 0" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# weights-only checkpoint and run-folder notes


def test_model_final_is_small_and_predicts_like_the_final_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, full = run / "model_final.pt", run / "checkpoint_final.pt"
    # Supervised: the student without its optimiser momentum, about half (CRLN also drops teacher and DIM).
    assert weights.stat().st_size < 0.6 * full.stat().st_size
    small, large = load_checkpoint(weights), load_checkpoint(full)
    assert "optimizer" not in small and "torch_rng" not in small
    assert {f"student.{k}" for k in small["method_state"]} == set(large["method_state"])
    notes = (run / "CHECKPOINTS.txt").read_text()
    assert "model_final.pt" in notes and "--resume" in notes
    _scan(tmp_path / "scan.nii.gz")
    for name, checkpoint in (("a", weights), ("b", full)):
        scan, out = str(tmp_path / "scan.nii.gz"), str(tmp_path / name)
        assert main(["predict", str(checkpoint), scan, "-o", out, "--probabilities"]) == 0
    a, b = (np.asarray(nib.load(tmp_path / n / "scan_seg.nii.gz").dataobj) for n in "ab")
    assert np.array_equal(a, b)
    # The 2-iteration network labels all but a handful of voxels background, so equal label maps prove
    # little: the probabilities must match too, and vary over the scan (a constant output, as from weights
    # lost in saving, could match without the two networks being alike).
    pa, pb = (torch.from_numpy(np.asarray(nib.load(tmp_path / n / "scan_prob.nii.gz").dataobj)) for n in "ab")
    assert pa.shape == (*SHAPE, 2)
    torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)
    assert float(pa[..., 1].max() - pa[..., 1].min()) > 1e-3
    assert main(["evaluate", str(weights), "--limit", "1", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["n_cases"] == 1
    capsys.readouterr()


def test_training_says_when_the_final_validation_runs(phantom_root: Path, tmp_path: Path, capsys) -> None:
    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.iterations": 1})
    assert main(["train", "demo", *overrides]) == 0
    out = capsys.readouterr().out
    assert "final validation on 1 held-out case(s)" in out and "final validation done" in out


# ----------------------------------------------------------------------------------------------------------
# strides for data at another scale


def test_scaled_stride_rule() -> None:
    assert scaled_stride((9, 9, 2), (64, 64, 48), 2.0) == (18, 18, 4)
    assert scaled_stride((18, 18, 4), (112, 112, 80), 0.5) == (9, 9, 2)
    assert scaled_stride((40, 40, 40), (64, 64, 48), 2.0) == (64, 64, 48)  # never beyond the patch
    assert scaled_stride((1, 1, 1), (64, 64, 48), 0.25) == (1, 1, 1)
    # The 455 s report: 9x9x2 windows on full-resolution LA against the scaled 18x18x4.
    assert window_count((130, 130, 88), (64, 64, 48), (9, 9, 2)) > 5 * window_count(
        (130, 130, 88), (64, 64, 48), (18, 18, 4)
    )


def test_prepare_records_the_scale_and_inference_scales_the_stride(phantom_root: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    prepare_h5_dataset(phantom_root, half, scale=0.5, log=lambda message: None)
    assert json.loads((half / SCALE_RECORD).read_text())["scale"] == 0.5
    assert recorded_scale(half) == 0.5 and recorded_scale(phantom_root) == 1.0
    assert recorded_scale(next(half.rglob("*.h5"))) == 0.5  # a scan inside the folder
    config = load_config("demo", ["data.patch_size=[64,64,48]", "eval.stride=[9,9,2]", f"data.root={half}"])
    assert inference_stride(config, None, half, None) == ((9, 9, 2), None)
    stride, note = inference_stride(config, None, phantom_root, None)
    assert stride == (18, 18, 4) and "scale 0.5" in note and "--stride" in note
    assert inference_stride(config, (5, 5, 5), phantom_root, None) == ((5, 5, 5), None)


def test_a_compact_copy_keeps_the_scale(phantom_root: Path, tmp_path: Path) -> None:
    from crln.data.compact import compact_h5_dataset

    prepare_h5_dataset(phantom_root, tmp_path / "half", scale=0.5, log=lambda message: None)
    compact_h5_dataset(tmp_path / "half", tmp_path / "compact", report=None)
    assert recorded_scale(tmp_path / "compact") == 0.5


def test_report_says_its_windows_and_takes_stride_options(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["report", str(run), "-o", str(out), "--stride", "32,32,16", "--sw-batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "windows, stride [32, 32, 16] ..." in printed
    assert (out / "report.html").is_file()


def test_an_output_never_replaces_an_input_scan(run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    _no_inference(monkeypatch)
    _scan(tmp_path / "scans" / "a.nii.gz")
    before = (tmp_path / "scans" / "a.nii.gz").read_bytes()
    argv = ["predict", run, tmp_path / "scans", "-o", tmp_path / "scans", "--nnunet-names", "--overwrite"]
    assert_user_error(argv, capsys, "output a.nii.gz would replace an input scan")
    assert (tmp_path / "scans" / "a.nii.gz").read_bytes() == before
