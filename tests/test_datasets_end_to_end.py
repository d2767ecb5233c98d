"""Issue #9's "done": each benchmark prepares from synthetic raw files through the CLI, trains a few
iterations with its preset (tiny overrides) and evaluates; the old ``crln data prepare`` form still works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crln.cli import main
from crln.config import load_config
from crln.data import H5Dataset
from raw_fixtures import write_brats_raw, write_la_raw, write_pancreas_raw

# Small enough for seconds on a CPU; everything else comes from the preset.
TINY = {
    "model.n_filters": 4,
    "data.patch_size": "[32,32,16]",
    "data.labeled": 1,
    "data.labeled_batch_size": 1,
    "data.num_workers": 0,
    "data.pin_memory": "false",
    "train.iterations": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.val_every": 2,  # = iterations: validate once, at the end (brats validates on its val.txt)
    "eval.stride": "[16,16,8]",
}

DATASETS = {
    # dataset: (raw writer, preset, test list name, expected network)
    "la": (lambda root: write_la_raw(root, n_cases=4, shape=(48, 40, 20)), "la", "test", "vnet"),
    "pancreas": (lambda root: write_pancreas_raw(root, n_cases=3, shape=(48, 44, 14)), "pancreas", "test", "vnet"),
    "brats": (lambda root: write_brats_raw(root, n_cases=5), "brats", "test", "unet3d"),
}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_prepare_train_evaluate_with_the_preset(dataset: str, tmp_path: Path) -> None:
    writer, preset, test_split, network = DATASETS[dataset]
    writer(tmp_path / "raw")
    data = tmp_path / "data"
    assert main(["data", "prepare", dataset, "--src", str(tmp_path / "raw"), "--dst", str(data)]) == 0
    overrides = [f"{k}={v}" for k, v in {**TINY, "data.root": data, "train.output_dir": tmp_path / "runs"}.items()]
    config = load_config(preset, overrides)
    assert config.model.name == network and config.data.patch_size == (32, 32, 16)
    run_dir = tmp_path / "run"
    assert main(["train", preset, *overrides, "--run-dir", str(run_dir), "--no-progress", "--evaluate"]) == 0
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == len(H5Dataset(data).ids(test_split)) >= 1
    assert 0.0 <= summary["metrics"]["dice"]["mean"] <= 1.0
    meta = json.loads((run_dir / "meta.json").read_text())
    if dataset == "brats":  # the field's val.txt validates; it is neither labelled nor unlabelled training data
        val_ids = H5Dataset(data).ids("val")
        assert meta["split"]["validation"] == val_ids
        assert not set(val_ids) & set(meta["split"]["labeled"] + meta["split"]["unlabeled"])
        assert (run_dir / "checkpoint_best.pt").is_file()


@pytest.mark.parametrize(
    ("preset", "labeled", "model", "tag"),
    [
        ("pancreas_crln", 6, "vnet", "6labels"),
        ("pancreas_crln_12", 12, "vnet", "12labels"),
        ("brats_crln", 25, "unet3d", "25labels"),
        ("brats_crln_50", 50, "unet3d", "50labels"),
    ],
)
def test_paper_presets(preset: str, labeled: int, model: str, tag: str) -> None:
    config = load_config(preset)
    assert (config.data.labeled, config.model.name, config.train.tag) == (labeled, model, tag)
    assert config.data.patch_size == (96, 96, 96) and config.eval.stride == (16, 16, 16)
    assert config.method.name == "crln" and config.method.rectify_start == 800 and config.method.xi == 0.6
    assert config.optim.lr == 0.0025 and config.data.labeled_batch_size == config.data.unlabeled_batch_size == 2


def test_old_prepare_form_still_rescales(tmp_path: Path) -> None:
    write_la_raw(tmp_path / "raw", n_cases=2, shape=(48, 40, 20))
    main(["data", "prepare", "la", "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "LA")])
    assert main(["data", "prepare", "--src", str(tmp_path / "LA"), "--dst", str(tmp_path / "half")]) == 0
    quarter_args = ["--src", str(tmp_path / "LA"), "--dst", str(tmp_path / "q"), "--scale", "0.25"]
    assert main(["data", "prepare", "rescale", *quarter_args]) == 0
    full, half, quarter = (H5Dataset(tmp_path / d) for d in ("LA", "half", "q"))
    cid = full.ids("train")[0]
    assert half.load(cid).shape == (24, 20, 10) and quarter.load(cid).shape == (12, 10, 5)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["la", "--scale", "0.5"], "--scale: not an option of 'crln data prepare la'"),
        (["rescale", "--split-dir", "x"], "--split-dir: not an option of 'crln data prepare rescale'"),
        (["brats", "--hu-range=-100,200"], "--hu-range: not an option of 'crln data prepare brats'"),
        (["la", "--margin", "2.5"], "--margin: expected a whole number of voxels"),
        (["pancreas", "--hu-range=300,-100"], "--hu-range 300,-100: expected low < high"),
    ],
)
def test_prepare_option_errors_are_one_line(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src").mkdir()
    assert main(["data", "prepare", *args, "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
