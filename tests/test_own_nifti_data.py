"""Own data as an nnU-Net user has it, end to end through the CLI: a NIfTI folder with truly unlabelled
images (no label file), a stray label file, a ``dataset.json`` declaring two channels, and per-channel
image files. ``crln train`` picks the split by label files and prints it, takes ``model.in_channels``
from ``dataset.json``, and ``evaluate``, ``predict`` and ``report`` run on the two-channel model.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import assert_user_error, tiny_overrides
from crln.cli import main
from crln.data import write_nifti, write_phantom_nifti_dataset

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def own_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training images (the last 2 without a label), 2 test cases, 2 channels, one stray label file."""
    root = tmp_path_factory.mktemp("own") / "Dataset001_Own"
    write_phantom_nifti_dataset(
        root, n_train=6, n_test=2, shape=SHAPE, seed=5, channels=2, n_unlabeled=2, spacing=(0.8, 0.8, 1.5)
    )
    write_nifti(root / "labelsTr" / "stray.nii.gz", np.zeros(SHAPE, np.uint8))
    return root


def _overrides(root: Path, runs: Path, **extra: object) -> list[str]:
    # model.in_channels and data.num_classes are left unset: dataset.json gives them
    values = {"data.format": "nifti", "train.iterations": 2, **extra}
    method = ["method.rectify_start=1"] if values.setdefault("method.name", "crln") == "crln" else []
    return [*tiny_overrides(root, runs, **values), *method]


@pytest.fixture(scope="module")
def own_run(own_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-iteration CRLN run on ``own_root``, and what ``crln train`` printed."""
    runs = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "demo", *_overrides(own_root, runs), "--no-progress"]) == 0
    (run,) = [p.parent for p in runs.rglob("checkpoint_final.pt")]
    return run, out.getvalue()


def test_split_by_label_files_is_printed(own_run: tuple[Path, str]) -> None:
    run, out = own_run
    assert "data: 3 labelled, 2 unlabelled, 1 validation cases; 4 of the 6 images of 'train' have a label file" in out
    assert "labelled: case_000, case_001, case_002" in out and "validation: case_003" in out
    assert "unlabelled: case_004, case_005" in out
    assert out.count("stray.nii.gz") == 1  # a label without an image is reported once
    assert json.loads((run / "meta.json").read_text())["split_rule"] in out


def test_two_channels_train_evaluate_predict_report(own_run: tuple[Path, str], own_root: Path, tmp_path: Path) -> None:
    run, _ = own_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["in_channels"] == 2 and config["data"]["num_classes"] == 2

    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["distance_unit"] == "mm"

    # predict: one MSD-style 4D file holding both channels keeps the input's affine
    channels = [nib.load(own_root / "imagesTs" / f"case_006_000{k}.nii.gz") for k in (0, 1)]
    scan = tmp_path / "scan.nii.gz"
    write_nifti(scan, np.stack([np.asarray(c.dataobj) for c in channels], -1), channels[0].affine)
    assert main(["predict", str(run), str(scan), "-o", str(tmp_path / "pred")]) == 0
    seg = nib.load(tmp_path / "pred" / "scan_seg.nii.gz")
    assert seg.shape == SHAPE and np.allclose(seg.affine, channels[0].affine)

    assert main(["report", str(run), "-o", str(tmp_path / "report"), "--quiet"]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "CRLN pseudo-label rectification" in html and "overlay of" in html


def _copy(own_root: Path, root: Path) -> dict[str, object]:
    """Copy the training part of ``own_root`` to ``root``; returns its dataset.json."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in (own_root / sub).iterdir():
            (root / sub / path.name).write_bytes(path.read_bytes())
    return json.loads((own_root / "dataset.json").read_text())


def test_corrupt_unlabelled_image_is_refused_by_train(
    own_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "corrupt"
    (root).mkdir()
    (root / "dataset.json").write_text(json.dumps(_copy(own_root, root)))
    path = root / "imagesTr" / "case_004_0001.nii.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    overrides = _overrides(root, tmp_path / "runs", **{"method.name": "mean_teacher"})
    assert_user_error(["train", "demo", *overrides], capsys, str(path), "corrupt gzip stream (CRC check failed)")
    assert not (tmp_path / "runs").exists()


def test_channel_mismatch_names_every_channel_file(
    own_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "no_channel_names"
    meta = _copy(own_root, root)
    del meta["channel_names"]  # model.in_channels falls back to 1
    (root / "dataset.json").write_text(json.dumps(meta))
    files = f"{root}/imagesTr/case_000_0000.nii.gz, {root}/imagesTr/case_000_0001.nii.gz"
    overrides = _overrides(root, tmp_path / "runs", **{"method.name": "supervised"})
    assert_user_error(["train", "demo", *overrides], capsys, files, "2 channel(s), expected model.in_channels = 1")


def test_dataset_json_contradiction_is_one_line(
    own_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _overrides(own_root, tmp_path / "runs", **{"model.in_channels": 1})
    fragment = "model.in_channels = 1 contradicts"
    assert_user_error(["train", "demo", *overrides], capsys, fragment, "'channel_names' (phantom, phantom_1) gives 2")
    assert not (tmp_path / "runs").exists()
