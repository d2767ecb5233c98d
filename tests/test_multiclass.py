"""C = 3 end to end: two-structure phantoms, CRLN (DIM, prototypes, rectifier, CPS) per class with
VNet and 3D-UNet, per-class metrics in evaluate, per-class tables and colours in the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.data import H5Dataset
from crln.data.batch import Batch
from crln.evaluation import format_summary_table
from crln.methods import method_for_run
from crln.metrics import per_class_metric_names
from crln.report import build_report

C = 3


@pytest.fixture(scope="module")
def two_structure_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 train + 2 test phantoms of 32³ with an organ (1) and an inclusion (2), written by the CLI."""
    root = tmp_path_factory.mktemp("three") / "data"
    args = ["data", "phantom", "--dst", str(root), "--train", "5", "--test", "2", "--shape", "32,32,32"]
    assert main([*args, "--num-classes", str(C), "--seed", "3"]) == 0
    return root


def _overrides(root: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "data.num_classes": C,
        "data.labeled": 2,
        "data.validation": 0,
        "method.name": "crln",
        "method.rectify_start": 1,
        "method.num_anchors": 16,
        "method.num_negatives": 32,
        "method.num_prototypes": 4,
        "data.patch_size": "[32,32,16]",
        "train.iterations": 2,
        "train.checkpoint_every": 2,
        **extra,
    }
    return tiny_overrides(root, out, **values)


def test_phantoms_hold_two_structures(two_structure_root: Path) -> None:
    dataset = H5Dataset(two_structure_root)
    for cid in dataset.ids("train") + dataset.ids("test"):
        label = dataset.load(cid).label
        assert set(np.unique(label).tolist()) == {0, 1, 2}, cid


def test_crln_step_is_per_class_on_the_3d_unet(two_structure_root: Path, tmp_path: Path) -> None:
    config = load_config("demo", _overrides(two_structure_root, tmp_path, **{"model.name": "unet3d"}))
    method = method_for_run(config)
    torch.manual_seed(0)
    assert method.student_dim.prototypes.shape[0] == C
    dataset = H5Dataset(two_structure_root)
    cases = [dataset.load(cid) for cid in dataset.ids("train")[:4]]
    depth = slice(8, 24)  # 32 x 32 x 16 patches through the middle
    images = torch.from_numpy(np.stack([c.image[..., depth] for c in cases]))[:, None]
    labels = torch.from_numpy(np.stack([c.label[..., depth] for c in cases]).astype(np.int64))
    batch = Batch(
        labeled_image=images[:2],
        labeled_label=labels[:2],
        unlabeled_image=images[2:],
        unlabeled_oracle_label=labels[2:],
    )
    out = method.train_step(batch, step=5)  # past rectify_start: teacher DIM + rectifier act on C maps
    assert torch.isfinite(out["loss"]) and out["rectified"] == 1.0
    for key in ("loss_dim", "loss_cps", "dice_all_before", "dice_all_after"):
        assert torch.isfinite(out[key]), key
    raw, rectified = method.teacher_pseudo_labels(images[2:], step=5)
    assert raw.shape == rectified.shape == (2, C, 32, 32, 16)
    out["loss"].backward()
    assert method.student_dim.prototypes.grad is not None


def test_crln_trains_evaluates_and_reports_per_class(two_structure_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "demo", *_overrides(two_structure_root, tmp_path), "--run-dir", str(run_dir), "--no-progress"]
    assert main([*args, "--evaluate"]) == 0
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    names = per_class_metric_names(summary["metrics"])
    assert names == [f"{m}_{c}" for c in (1, 2) for m in ("dice", "jaccard", "asd", "hd95")]
    with (run_dir / "eval" / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"dice_1", "dice_2", "hd95_2"} <= set(rows[0])
    for row in rows:  # the plain Dice is the mean of the classes'
        assert float(row["dice"]) == pytest.approx((float(row["dice_1"]) + float(row["dice_2"])) / 2, abs=1e-5)
    table = format_summary_table(summary)
    assert "| dice_1 |" in table and "| hd95_2 |" in table
    result = build_report(run_dir, progress=False)
    html = result.html.read_text()
    assert "Dice class 1 %" in html and "Dice class 2 %" in html and "Dice (mean over classes) %" in html
    assert "rectification" in result.figures
