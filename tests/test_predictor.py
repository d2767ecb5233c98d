"""The Predictor (checkpoint → eval.network → labels and probabilities), ``eval.checkpoint``, the metric
registry and the methods' report hooks, on one tiny CRLN phantom run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from crln import metrics
from crln.config import load_config
from crln.data import H5Dataset
from crln.engine.trainer import train
from crln.errors import CrlnError
from crln.evaluation import evaluate, format_summary_table
from crln.methods import method_class
from crln.methods.crln import RectifiedNetwork
from crln.metrics import Metric, case_metrics
from crln.predictor import Predictor

SRC = Path(__file__).resolve().parents[1] / "src" / "crln"


@pytest.fixture(scope="module")
def crln_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CRLN predicting with its rectified teacher, evaluated by default on the validation-best checkpoint."""
    extra = {
        "method.name": "crln",
        "method.rectify_start": 2,
        "train.val_every": 3,
        "eval.network": "teacher_rectified",
        "eval.checkpoint": "best",
    }
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path_factory.mktemp("predictor"), **extra))
    return train(config, progress=False).run_dir


def _test_cases(phantom_root: Path) -> list:
    dataset = H5Dataset(phantom_root)
    return dataset.load_many(dataset.ids("test"), with_label=True)


def test_predict_gives_labels_and_probabilities(crln_run: Path, phantom_root: Path) -> None:
    predictor = Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu")
    assert isinstance(predictor.network, RectifiedNetwork)  # the run's eval.network, not the student
    assert not predictor.network.training and predictor.method is None
    case = _test_cases(phantom_root)[0]
    labels, probabilities = predictor.predict(case.image)
    assert labels.shape == case.image.shape and labels.dtype == np.uint8
    assert probabilities.shape == (2, *case.image.shape) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(0), torch.ones(case.image.shape), atol=1e-5)
    assert np.array_equal(labels, probabilities.argmax(0).numpy())


def test_predict_refuses_an_image_the_network_cannot_segment(crln_run: Path, phantom_root: Path) -> None:
    """From Python as from the CLI: wrong channels, non-finite voxels or an empty axis are a CrlnError, not a
    torch error or a silent prediction."""
    predictor = Predictor.from_checkpoint(crln_run / "model_final.pt", device="cpu")
    image = _test_cases(phantom_root)[0].image
    with pytest.raises(CrlnError, match=r"image has 2 channel\(s\), expected model\.in_channels = 1"):
        predictor.predict(np.stack([image, image]))
    with pytest.raises(CrlnError, match=r"image has 1 NaN and 0 Inf voxels"):
        predictor.predict(np.where(image == image.max(), np.nan, image))
    with pytest.raises(CrlnError, match=r"empty axis"):
        predictor.predict(image[:0])
    with pytest.raises(CrlnError, match=r"expected 3D \(H, W, D\) or 4D"):
        predictor.predict(image[..., 0])


def test_predict_tunes_cuda_only_while_it_runs(crln_run: Path, phantom_root: Path) -> None:
    """cuDNN autotuning and TF32 are process-wide flags: a predictor (here one that would tune, as on CUDA) sets
    them for its own forward passes and gives the caller's back, so a notebook's other code keeps its numerics."""
    import dataclasses

    predictor = Predictor.from_checkpoint(crln_run / "model_final.pt", device="cpu")
    predictor.perf = dataclasses.replace(predictor.perf, cuda_tuning=True)
    network, seen = predictor.network, []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32))
        return network(x)

    predictor.network = recording
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        predictor.predict(_test_cases(phantom_root)[0].image)
        assert seen and all(flags == (True, True) for flags in seen)
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_inference_weights_file_predicts_as_the_full_checkpoint(crln_run: Path, phantom_root: Path) -> None:
    image = _test_cases(phantom_root)[0].image
    full = Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu")
    shared = Predictor.from_checkpoint(crln_run / "model_final.pt", device="cpu")
    assert isinstance(shared.network, RectifiedNetwork) and shared.step == full.step
    # the shared file carries what the run folder's meta.json says of the data (phantoms: scale 1, no pipeline)
    assert shared.training_data == {"data_scale": 1.0, "data_preparation": None}
    labels, probabilities = shared.predict(image)
    expected_labels, expected = full.predict(image)
    assert np.array_equal(labels, expected_labels)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    with pytest.raises(CrlnError, match=r"model_final\.pt.*full checkpoint"):
        Predictor.from_checkpoint(crln_run / "model_final.pt", device="cpu", with_method=True)


def test_evaluation_scores_the_predictors_labels(crln_run: Path, phantom_root: Path, tmp_path: Path) -> None:
    result = evaluate(crln_run, checkpoint="final", device="cpu", out_dir=tmp_path / "eval", progress=False)
    predictor = Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu")
    for row, case in zip(result["per_case"], _test_cases(phantom_root), strict=True):
        labels, _ = predictor.predict(case.image)
        expected = case_metrics(labels, case.label, num_classes=2, spacing=case.spacing)
        assert row["case"] == case.case_id
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, nan_ok=True), name


def test_eval_checkpoint_chooses_what_evaluate_uses(crln_run: Path, tmp_path: Path) -> None:
    """eval.checkpoint=best: a plain ``crln evaluate <run>`` scores checkpoint_best.pt into <run>/eval."""
    result = evaluate(crln_run, device="cpu", limit=1, progress=False)
    assert Path(result["summary"]["checkpoint"]).name == "checkpoint_best.pt"
    assert result["out_dir"] == crln_run / "eval"
    final = evaluate(crln_run, checkpoint="final", device="cpu", limit=1, progress=False)
    assert final["out_dir"] == crln_run / "eval_test_final"  # not the run's own evaluation
    copy = tmp_path / "run"
    shutil.copytree(crln_run, copy)
    (copy / "checkpoint_best.pt").unlink()
    with pytest.raises(CrlnError, match=r"no checkpoint_best\.pt"):
        evaluate(copy, device="cpu", limit=1, progress=False)
    with pytest.raises(CrlnError, match=r"checkpoint 'last': expected one of latest, best, final"):
        evaluate(crln_run, checkpoint="last", device="cpu", limit=1, progress=False)


def test_evaluate_on_the_runs_held_out_validation_cases(
    crln_run: Path, phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """split="validation" scores the cases the run validated on, as its training validation scored them."""
    result = evaluate(crln_run, split="validation", checkpoint="best", device="cpu", progress=False)
    held_out = json.loads((crln_run / "meta.json").read_text())["split"]["validation"]
    assert [row["case"] for row in result["per_case"]] == held_out and held_out
    assert result["out_dir"] == crln_run / "eval_validation_best" and result["summary"]["split"] == "validation"
    logged = [r for r in map(json.loads, (crln_run / "log.jsonl").read_text().splitlines()) if "val_dice" in r]
    (at_best,) = [r["val_dice"] for r in logged if r["step"] == result["summary"]["checkpoint_step"]]
    assert result["summary"]["metrics"]["dice"]["mean"] == pytest.approx(at_best, abs=1e-3)
    other = tmp_path / "other"
    shutil.copytree(phantom_root, other)
    with pytest.raises(CrlnError, match=r"--split validation: the run's held-out cases are in its own data"):
        evaluate(crln_run, split="validation", data_root=other, device="cpu", progress=False)
    import crln.evaluation
    from crln.data.splits import Split

    # a run without a recorded split (meta.json's, which comes first) is split as its config says
    monkeypatch.setattr(crln.evaluation.RunFolder, "recorded_split", lambda self: None)
    monkeypatch.setattr(crln.evaluation, "plan_split", lambda dataset, data: (Split(["a"], [], []), ""))
    with pytest.raises(CrlnError, match=r"--split validation: the run held out no validation cases"):
        evaluate(crln_run, split="validation", device="cpu", out_dir=tmp_path / "none", progress=False)


def test_bn_mode_check_scores_as_evaluate_with_running_statistics(crln_run: Path) -> None:
    """benchmarks/bn_mode_check.py: its running-statistics column is the evaluation's Dice of the student."""
    sys.path.insert(0, str(SRC.parents[1] / "benchmarks"))
    from bn_mode_check import dice_by_bn_mode

    scores = dice_by_bn_mode(crln_run, "final", "validation")
    result = evaluate(crln_run, split="validation", checkpoint="final", network="student", progress=False)
    assert scores["case"] == [row["case"] for row in result["per_case"]]
    assert scores["running"] == pytest.approx([row["dice"] for row in result["per_case"]], abs=1e-4)
    assert len(scores["batch"]) == len(scores["case"]) and all(0.0 <= d <= 1.0 for d in scores["batch"])
    assert scores["batch"] != scores["running"]  # the statistics really were switched (not BatchNorm folded away)


def _foreground_fraction(pair: metrics.MaskPair) -> float:
    return float(np.count_nonzero(pair.pred)) / pair.pred.size


def test_a_metric_added_to_the_registry_reaches_every_output(
    crln_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = Metric("fg_fraction", _foreground_fraction, metrics.PERCENT, "Foreground", higher_is_better=False)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, added))
    result = evaluate(crln_run, device="cpu", limit=1, out_dir=tmp_path / "eval", progress=False)
    assert "fg_fraction" in result["summary"]["metrics"]
    with (tmp_path / "eval" / "per_case.csv").open() as handle:
        columns = next(csv.reader(handle))
    assert columns == ["case", "dice", "jaccard", "asd", "hd95", "fg_fraction", "seconds"]
    assert "fg_fraction" in json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]
    assert "| fg_fraction |" in format_summary_table(result["summary"])

    from crln import bench
    from crln.report.build import _per_case_table, _summary_rows

    assert "Foreground %" in [row[0] for row in _summary_rows(result["summary"]["metrics"], "voxels")]
    assert "Foreground %" in _per_case_table(result["per_case"], "voxels")
    assert bench._units_sentence() == "Dice, Jaccard and Foreground in %, ASD and 95HD in the dataset's distance unit."


def test_methods_state_their_own_report_facts_and_timeline_marks() -> None:
    crln = load_config("demo", ["method.name=crln", "method.rectify_start=40"]).method
    (mark,) = method_class("crln").timeline_marks(crln)
    assert (mark.step, mark.label) == (40, "S")
    assert method_class("crln").report_facts(crln) == [("rectification start S", "40")]
    no_dim = load_config("demo", ["method.name=crln", "method.dim=false", "method.cps_positive=mean"]).method
    assert method_class("crln").timeline_marks(no_dim) == ()
    bcp = load_config("demo", ["method.name=bcp", "method.pretrain_iterations=50"]).method
    assert [m.step for m in method_class("bcp").timeline_marks(bcp)] == [50]
    supervised = load_config("demo", []).method
    assert method_class(supervised.name).timeline_marks(supervised) == ()
    assert method_class(supervised.name).report_facts(supervised) == []


def test_evaluation_and_report_import_neither_the_training_loop_nor_each_other() -> None:
    code = (
        "import sys, crln.report, crln.report.bench_figures; "
        "assert 'crln.evaluation' not in sys.modules, 'report imports evaluation'; "
        "import crln.evaluation; "
        "assert 'crln.engine.trainer' not in sys.modules, 'evaluation or report imports the training loop'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    sources = [SRC / "evaluation.py", SRC / "predictor.py", *sorted((SRC / "report").glob("*.py"))]
    for path in sources:  # imports inside functions count too
        assert "crln.engine.trainer" not in path.read_text(), path


def test_another_network_of_a_full_checkpoint_is_evaluated_beside_the_runs_own(crln_run: Path) -> None:
    teacher = Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu", network="teacher")
    assert not isinstance(teacher.network, RectifiedNetwork)
    assert teacher.config.eval.network == "teacher" and teacher.run_network == "teacher_rectified"
    method = Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu", with_method=True).method
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = teacher.network(x)
        assert torch.allclose(out, method.teacher(x), atol=1e-4)
        assert not torch.allclose(out, method.student(x), atol=1e-4)
    result = evaluate(crln_run, checkpoint="final", network="teacher", progress=False)
    assert result["out_dir"] == crln_run / "eval_test_final_teacher"
    assert result["summary"]["network"] == "teacher"
    with pytest.raises(CrlnError, match=r"model_final.pt: holds only the 'teacher_rectified' network .* not 'student'"):
        Predictor.from_checkpoint(crln_run / "model_final.pt", device="cpu", network="student")
    with pytest.raises(CrlnError, match=r"eval.network: 'nope' is not available for method 'crln'"):
        Predictor.from_checkpoint(crln_run / "checkpoint_final.pt", device="cpu", network="nope")
