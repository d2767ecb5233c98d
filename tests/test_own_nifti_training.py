"""Training on one's own nnU-Net / MSD NIfTI folder: what a researcher's data does to ``crln train``.

Each test builds a small phantom folder (32×32×32 volumes, 2 iterations), changes it as real data is
often changed (a case added between a run and its resume, a missing channel file, more classes than
the config says), and checks that the run either goes on as documented or stops with one
``crln: error:`` line naming the file or key, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_user_error, tiny_overrides
from crln.cli import main
from crln.data import write_phantom_nifti_dataset

SHAPE = (32, 32, 32)


def _root(tmp_path: Path, **kwargs: object) -> Path:
    """A phantom nnU-Net folder of 5 labelled training images and one test case."""
    values: dict[str, object] = {"n_train": 5, "n_test": 1, "shape": SHAPE, "seed": 3, **kwargs}
    return write_phantom_nifti_dataset(tmp_path / "Dataset002_Own", **values)  # type: ignore[arg-type]


def _overrides(root: Path, runs: Path, **extra: object) -> list[str]:
    values = {"data.format": "nifti", "train.iterations": 2, "method.name": "supervised", **extra}
    return tiny_overrides(root, runs, **{"data.labeled": 2, "data.validation": 1, **values})


def _train(argv: list[str]) -> str:
    """Run ``crln train`` in-process (it must succeed); returns what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "demo", *argv, "--no-progress"]) == 0
    return out.getvalue()


# --- resume ---------------------------------------------------------------------------------------


def test_resume_refuses_a_data_folder_that_now_splits_differently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A case added between a run and its resume would become the validation case (the last id), and the
    old one an unlabelled training case, while meta.json still records the old split."""
    root, runs = _root(tmp_path), tmp_path / "runs"
    _train(_overrides(root, runs))
    (run,) = [p.parent for p in runs.rglob("checkpoint_final.pt")]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    shutil.copy(root / "imagesTr" / "case_004_0000.nii.gz", root / "imagesTr" / "case_009_0000.nii.gz")
    shutil.copy(root / "labelsTr" / "case_004.nii.gz", root / "labelsTr" / "case_009.nii.gz")

    argv = ["train", "demo", *_overrides(root, runs, **{"train.iterations": 3}), "--resume"]
    line = assert_user_error(argv, capsys, "--resume:", str(root), "meta.json", "validation", "case_009")
    assert "case_004" in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing rewritten

    (root / "imagesTr" / "case_009_0000.nii.gz").unlink()  # the data as it was: the resume goes on
    (root / "labelsTr" / "case_009.nii.gz").unlink()
    _train([*_overrides(root, runs, **{"train.iterations": 3}), "--resume"])
    assert json.loads((run / "meta.json").read_text())["split"]["validation"] == ["case_004"]


# --- the split printed ----------------------------------------------------------------------------


def test_a_method_without_unlabelled_cases_says_so_on_a_line_of_its_own(tmp_path: Path) -> None:
    """The note was appended to the split's last line, the validation cases, as if it were about them."""
    out = _train(_overrides(_root(tmp_path), tmp_path / "runs"))
    lines = out.splitlines()
    assert "  validation: case_004" in lines and "  unlabelled: case_002, case_003" in lines
    assert "  (method 'supervised' does not use the unlabelled cases)" in lines


# --- channel files --------------------------------------------------------------------------------


def test_a_case_without_its_first_channel_file_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said 'has channels [1], expected 0..0', an expectation no file of the folder can meet."""
    root = _root(tmp_path, channels=2)
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    argv = ["train", "demo", *_overrides(root, tmp_path / "runs")]
    line = assert_user_error(argv, capsys, f"{root / 'imagesTr'}: case 'case_001' has channels [1] but no ")
    assert "case_001_0000.nii.gz, expected channels 0..1 without a gap" in line
    assert not (tmp_path / "runs").exists()


def test_a_case_without_its_last_channel_file_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said 'case_001_0000.nii.gz: image has 1 channel(s), expected model.in_channels = 2', naming the file
    that is there and not the one that is missing."""
    root = _root(tmp_path, channels=2)
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    argv = ["train", "demo", *_overrides(root, tmp_path / "runs")]
    line = assert_user_error(argv, capsys, f"{root / 'imagesTr' / 'case_001_0000.nii.gz'}: image has 1 channel(s)")
    assert line.endswith("expected model.in_channels = 2: no case_001_0001.nii.gz beside it")
    assert not (tmp_path / "runs").exists()


# --- classes --------------------------------------------------------------------------------------


def test_more_classes_in_the_labels_than_configured_names_data_num_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a dataset.json, data.num_classes is 2: a 3-class label said only 'outside [0, 1]'."""
    root = _root(tmp_path, num_classes=3)
    (root / "dataset.json").unlink()
    argv = ["train", "demo", *_overrides(root, tmp_path / "runs")]
    label = root / "labelsTr" / "case_000.nii.gz"
    assert_user_error(argv, capsys, f"{label}: label values [2] outside", "[0, 1] of data.num_classes = 2")
    assert not (tmp_path / "runs").exists()


def test_a_presets_num_classes_against_dataset_json_says_which_override_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 'la' preset sets data.num_classes: 2; 'leave data.num_classes unset' was no way out of that."""
    root = _root(tmp_path, num_classes=3)
    argv = ["train", "la", f"data.root={root}", "data.format=nifti", f"train.output_dir={tmp_path / 'runs'}"]
    assert_user_error(argv, capsys, "config key data.num_classes = 2 contradicts", "override data.num_classes=3")
    assert not (tmp_path / "runs").exists()


# --- folders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["train", "evaluate"])
def test_a_missing_image_folder_is_named(verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Training on a folder without imagesTr/ said 'the training list holds only 0', evaluating one without
    imagesTs/ 'case list 'test' … is empty': neither names the folder crln looked for."""
    root = _root(tmp_path)
    missing = "imagesTr" if verb == "train" else "imagesTs"
    shutil.rmtree(root / missing)
    if verb == "train":
        argv = ["train", "demo", *_overrides(root, tmp_path / "runs")]
    else:
        _train(_overrides(_root(tmp_path / "other"), tmp_path / "runs"))
        (run,) = [p.parent for p in (tmp_path / "runs").rglob("checkpoint_final.pt")]
        argv = ["evaluate", str(run), "--data", str(root), "--out", str(tmp_path / "eval")]
    assert_user_error(argv, capsys, f"{root / missing}: no such folder, expected")
    assert not (tmp_path / "eval").exists()


def test_evaluate_validation_scores_the_cases_the_run_held_out(tmp_path: Path) -> None:
    """--split validation re-planned the split on the folder as it is now: with a case added since training
    it scored the new last id, not the case the run held out (which could even have trained)."""
    root, runs = _root(tmp_path), tmp_path / "runs"
    _train(_overrides(root, runs))
    (run,) = [p.parent for p in runs.rglob("checkpoint_final.pt")]
    shutil.copy(root / "imagesTr" / "case_004_0000.nii.gz", root / "imagesTr" / "case_009_0000.nii.gz")
    shutil.copy(root / "labelsTr" / "case_004.nii.gz", root / "labelsTr" / "case_009.nii.gz")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(run), "--split", "validation", "--out", str(tmp_path / "eval")]) == 0
    rows = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["case_004"]
