"""`crln predict` on raw scans prepares them as the pipeline behind the run's training data did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crln.cli import main
from crln.data import H5Dataset
from crln.data.prepare import prepare_h5_dataset, recorded_preparation
from crln.data.prepare_raw import prepare_brats_raw, scan_normalizer
from crln.data_formats import read_scan
from crln.errors import CrlnError
from raw_fixtures import write_brats_raw


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict]]:
    """Raw BraTS cases and the h5 folder ``crln data prepare brats`` made of them."""
    root = tmp_path_factory.mktemp("brats")
    truth = write_brats_raw(root / "raw", n_cases=5)
    prepare_brats_raw(root / "raw", root / "BraTS", log=lambda _: None)
    return root / "raw", root / "BraTS", truth


def _flair(raw: Path, cid: str) -> Path:
    (path,) = raw.rglob(f"{cid}_flair.nii.gz")
    return path


def test_a_raw_brats_scan_is_normalised_as_its_prepared_volume(brats: tuple[Path, Path, dict[str, dict]]) -> None:
    raw, prepared, truth = brats
    preparation = recorded_preparation(prepared)
    assert preparation is not None and preparation["dataset"] == "brats"
    normalize = scan_normalizer(preparation)
    dataset = H5Dataset(prepared)
    for cid, info in truth.items():
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(info["flair"] > 0))
        stored = dataset.load(cid).image
        as_trained = read_scan([_flair(raw, cid)], cid, normalize).image
        np.testing.assert_allclose(as_trained[box], stored, rtol=0, atol=1e-5)
        default = read_scan([_flair(raw, cid)], cid).image  # the whole-volume z-score of a user's own NIfTI
        assert np.abs(default[box] - stored).max() > 0.1


def test_a_rescaled_copy_reports_the_pipeline_of_its_source(
    brats: tuple[Path, Path, dict[str, dict]], tmp_path: Path
) -> None:
    _, prepared, _ = brats
    prepare_h5_dataset(prepared, tmp_path / "half", scale=0.5, log=lambda _: None)
    assert recorded_preparation(tmp_path / "half") == recorded_preparation(prepared)
    assert recorded_preparation(tmp_path) is None  # no manifest: the field's files or a user's own data


def test_no_preparation_keeps_the_readers_z_score() -> None:
    assert scan_normalizer(None) is None
    assert scan_normalizer({"dataset": "la", "options": {}}) is None


@pytest.mark.parametrize("recorded_in", ["model_final.pt", "meta.json"])
def test_a_pancreas_run_refuses_raw_scans_in_one_line(
    recorded_in: str, brats: tuple[Path, Path, dict[str, dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CrlnError, match="a raw scan cannot be prepared the same way"):
        scan_normalizer({"dataset": "pancreas", "options": {}})
    raw, _, truth = brats
    weights = _weights_trained_on(tmp_path, {"dataset": "pancreas", "options": {}}, recorded_in)
    scan = _flair(raw, next(iter(truth)))
    assert main(["predict", str(weights), str(scan), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"crln: error: input {scan}: the network was trained on volumes") and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_final_carries_its_training_data_record(
    brats: tuple[Path, Path, dict[str, dict]], tmp_path: Path
) -> None:
    """A model_final.pt shared alone (no run folder beside it) still knows how its data was prepared."""
    from crln.predictor import Predictor

    preparation = recorded_preparation(brats[1])
    weights = _weights_trained_on(tmp_path, preparation, "model_final.pt")
    predictor = Predictor.from_checkpoint(weights, "cpu")
    assert predictor.training_data == {"data_scale": 1.0, "data_preparation": preparation}


def _weights_trained_on(folder: Path, preparation: dict | None, recorded_in: str) -> Path:
    """An untrained demo network's ``model_final.pt`` whose data came from ``preparation``, recorded in the
    file itself (shared alone) or only in its run folder's ``meta.json`` (a run from before the record)."""
    import yaml

    from crln.config import config_to_dict, load_config
    from crln.engine.checkpoint import save_checkpoint
    from crln.engine.state import inference_weights
    from crln.methods import method_for_run

    config = load_config("demo", ["model.n_filters=2"])
    record = {"data_scale": 1.0, "data_preparation": preparation}
    folder = folder / "run"
    folder.mkdir()
    if recorded_in == "meta.json":
        (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))  # what makes it a run folder
        (folder / "meta.json").write_text(json.dumps(record))
    shared = inference_weights(method_for_run(config), config, 0, record if recorded_in == "model_final.pt" else None)
    save_checkpoint(folder / "model_final.pt", shared)
    return folder / "model_final.pt"
