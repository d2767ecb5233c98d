"""CLI smoke tests: every verb, its --help, and one-line user errors (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import tiny_overrides
from crln.cli import build_parser, main

VERBS = [
    ["train"],
    ["evaluate"],
    ["predict"],
    ["data", "prepare"],
    ["data", "phantom"],
    ["data", "compact"],
    ["data", "merge"],
    ["data", "stats"],
    ["config"],
    ["demo"],
    ["bench"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_help_of_every_verb(verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: crln" in out and len(out.splitlines()) > 5


def test_parser_lists_all_verbs() -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    expected = {"train", "evaluate", "predict", "data", "config", "demo", "bench", "report"}
    assert set(commands.choices) == expected
    # the help's command list, one "    <verb>  <summary>" line each: a verb whose name only occurs inside
    # another's summary (as "train" does in the demo's) is not listed
    listed = re.findall(r"^ {4}([a-z]+)(?: {2,}|$)", parser.format_help(), flags=re.MULTILINE)
    assert sorted(listed) == sorted(expected)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crln", *args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "no_such_preset"], "no such file or preset"),
        (["train", "demo", "optim.lrr=1"], "did you mean 'lr'"),
        (["evaluate", "/nonexistent/run"], "no such run folder"),
        (["predict", "/nonexistent.pt", "x.nii.gz", "-o", "out"], "no such run folder or checkpoint"),
        (["data", "prepare", "--src", "/nonexistent", "--dst", "/tmp/x", "--scale", "0.5"], "/nonexistent"),
        (["data", "prepare", "--src", "/tmp", "--dst", "/tmp/x", "--scale", "2"], "--scale"),
        (["train", "demo", "data.root=/nonexistent/data"], "/nonexistent/data"),
        (["data", "stats", "/nonexistent/data"], "/nonexistent/data: no such folder"),
    ],
)
@pytest.mark.slow
def test_user_errors_are_one_line(args: list[str], fragment: str, tmp_path: Path) -> None:
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("crln: error:"), proc.stderr
    assert fragment in lines[0]


def test_train_evaluate_predict_end_to_end(phantom_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(phantom_root, tmp_path / "runs", **{"train.iterations": 4})
    assert main(["train", "demo", *overrides, "--no-progress"]) == 0
    run = tmp_path / "runs" / "phantom" / "supervised__vnet__demo" / "seed1337"
    assert (run / "checkpoint_final.pt").is_file()

    assert main(["evaluate", str(run), "--limit", "1"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and set(summary["metrics"]) >= {"dice", "jaccard", "asd", "hd95"}
    assert (run / "eval" / "per_case.csv").read_text().startswith("case,")
    assert main(["evaluate", str(run), "--limit", "1", "--largest-component", "--checkpoint", "best"]) == 0
    lcc = json.loads((run / "eval_test_best_lcc" / "summary.json").read_text())
    assert lcc["largest_component"] is True and lcc["n_cases"] == 1

    # Predict on a NIfTI file (affine kept) and on an h5 case.
    image = np.random.default_rng(0).normal(size=(40, 36, 30)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan_0000.nii.gz")
    h5_case = next(phantom_root.rglob("*.h5"))
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(run / "checkpoint_final.pt"),
                str(tmp_path / "scan_0000.nii.gz"),
                str(h5_case),
                "-o",
                str(out),
                "--probabilities",
                "--entropy",
                "--preview",
            ]
        )
        == 0
    )
    seg = nib.load(out / "scan_seg.nii.gz")
    assert seg.shape == (40, 36, 30) and np.allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    assert nib.load(out / "scan_prob.nii.gz").shape == (40, 36, 30, 2)
    assert (out / "scan_entropy.nii.gz").is_file()
    import matplotlib.image

    assert matplotlib.image.imread(out / "scan_overlay.png").shape[0] > 100
    assert len(list(out.glob("*_seg.nii.gz"))) == 2


def test_config_verb_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "la_cpu", "optim.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.02" in out and "patch_size:" in out


def test_config_verb_without_argument_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(names) and {"la_cpu_crln", "la_crln", "demo"} <= set(names)
    crln_line = lines[names.index("la_crln")]
    assert "CRLN on Left Atrium" in crln_line


def test_config_verb_with_an_override_first_names_the_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.iterations=5"]) == 2
    assert "is an override; name a preset or YAML file first" in capsys.readouterr().err


def test_data_phantom_and_prepare(tmp_path: Path) -> None:
    src = tmp_path / "ph"
    assert main(["data", "phantom", "--dst", str(src), "--train", "2", "--test", "1", "--shape", "32,32,16"]) == 0
    dst = tmp_path / "ph_half"
    assert main(["data", "prepare", "--src", str(src), "--dst", str(dst), "--scale", "0.5"]) == 0
    assert (dst / "train.list").read_text() == (src / "train.list").read_text()


def test_data_phantom_refuses_a_folder_holding_another_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A phantom written into a real dataset's folder would replace its case lists; a rerun with fewer cases
    # would leave the old case files beside the new ones.
    real = tmp_path / "LA"
    real.mkdir()
    (real / "train.list").write_text("case_a\n")
    argv = ["data", "phantom", "--dst", str(real), "--train", "2", "--test", "1", "--shape", "32,32,16"]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"crln: error: --dst {real}: holds train.list, expected a new or empty folder"
    )
    assert (real / "train.list").read_text() == "case_a\n" and sorted(p.name for p in real.iterdir()) == ["train.list"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv[:3], str(empty), *argv[4:]]) == 0  # an empty folder is fine


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train", "0"], "--train 0 --test 4: expected --train >= 1 and --test >= 0"),
        (["--test", "-1"], "--train 12 --test -1: expected --train >= 1 and --test >= 0"),
        (["--shape", "4,32,32"], "--shape 4,32,32: expected at least 8 voxels per axis and at most 512³ voxels in all"),
        (["--shape", "10000"], "--shape 10000,10000,10000: expected at least 8 voxels"),
        (["--num-classes", "300"], "--num-classes 300: expected 2 to 256 for a phantom"),
    ],
)
def test_data_phantom_flags_out_of_range_are_named_as_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["data", "phantom", "--dst", str(tmp_path / "ph"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "ph").exists()


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--out", str(tmp_path / "demo"), "--iterations", "4", "--train-cases", "7", "--test-cases", "1"]
    tiny = ["model.n_filters=4", "data.patch_size=[32,32,32]", "train.val_every=2", "data.num_workers=0"]
    assert main([*args, "--no-progress", *tiny]) == 0
    out = capsys.readouterr().out
    assert "| supervised | final | 1337 |" in out and "| crln | final | 1337 |" in out
    assert "| crln | val-best" not in out  # the demo reports its final checkpoint
    assert "val Dice" not in out and not list((tmp_path / "demo").rglob("eval_validation_*"))  # plan: validation off
    assert "method.rectify_start=1" in out  # CRLN's S scaled to the short run
    # A second demo starts afresh in its own folder instead of refusing an existing run.
    assert main([*args, "--no-progress", "--methods", "mean_teacher", *tiny]) == 0
    assert "| mean_teacher | final | 1337 |" in capsys.readouterr().out


def test_nifti_dataset_trains_and_reports_mm(tmp_path: Path) -> None:
    from crln.data.phantom import write_phantom_nifti_dataset

    root = write_phantom_nifti_dataset(
        tmp_path / "nii", n_train=5, n_test=1, shape=(32, 32, 32), seed=3, spacing=(0.8, 0.8, 1.5)
    )
    overrides = tiny_overrides(
        root, tmp_path / "runs", **{"data.format": "nifti", "train.iterations": 2, "data.validation": 0}
    )
    assert main(["train", "demo", *overrides, "--no-progress", "--evaluate"]) == 0
    run = tmp_path / "runs" / "phantom" / "supervised__vnet__demo" / "seed1337"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["distance_unit"] == "mm" and summary["n_cases"] == 1


def test_a_reader_that_closes_the_pipe_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``crln config demo | head -1``: the reader leaves early; no traceback, the shell's SIGPIPE status."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["config", "demo"]) == 141
