"""Issue #21, sections 3–4: overrides anywhere, configs checked before torch loads, exit codes,
readable logs outside a terminal, and the small things a new user tripped on."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from conftest import tiny_overrides
from crln.cli import _terminal_text, main, parse_args
from crln.config import MODEL_NAMES
from crln.engine.cpu_threads import SPIN_COUNT
from crln.engine.progress import PlainProgress, format_duration, progress_bar
from crln.engine.trainer import TrainResult
from crln.errors import RunInterrupted
from crln.models import MODELS


def test_overrides_are_taken_after_options() -> None:
    args = parse_args(["train", "demo", "a.b=1", "--no-progress", "model.in_channels=2", "--resume", "x.y=[1,2]"])
    assert args.no_progress and args.resume
    assert args.overrides == ["a.b=1", "model.in_channels=2", "x.y=[1,2]"]
    assert parse_args(["demo", "--no-progress", "train.iterations=3"]).overrides == ["train.iterations=3"]


def test_stray_argument_shows_the_usage_of_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["train", "demo", "--no-progress", "stray"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: crln train ") and "unrecognized arguments: stray" in err
    with pytest.raises(SystemExit):  # a verb without overrides refuses key=value too, with its own usage
        parse_args(["evaluate", "runs/x", "a=1"])
    assert capsys.readouterr().err.startswith("usage: crln evaluate ")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_config_errors_are_reported_without_importing_torch(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("runs:\n  - config: demo\n    overridez: [optim.lr=1]\n")
    code = f"""
import sys
from crln.cli import main
codes = [main(argv) for argv in (
    ["train", "demo", "--no-progress", "model.nonexistent=1"],
    ["train", "demo", "method.name=crln", "method.tau_w=0.98"],
    ["train", "demo", "model.name=vnett"],
    ["config", "demo", "train.iterations=many"],
    ["bench", {str(plan)!r}],
)]
print(codes, sorted(m for m in ("torch", "numpy", "monai") if m in sys.modules))
"""
    proc = _python(code)
    assert proc.stdout.strip() == "[2, 2, 2, 2, 2] []", proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 5 and all(line.startswith("crln: error: ") for line in lines), proc.stderr
    assert "did you mean 'vnet'" not in lines[2] and "model.name" in lines[2]
    assert "did you mean 'overrides'" in lines[4]


@pytest.mark.slow
def test_openmp_is_configured_before_torch_loads() -> None:
    code = """
import os, sys
for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
    os.environ.pop(name, None)
from crln.cli import main
main(["config", "demo"])
print(os.environ["GOMP_SPINCOUNT"], "torch" in sys.modules)
"""
    proc = _python(code)
    assert proc.stdout.splitlines()[-1] == f"{SPIN_COUNT} False", proc.stderr


def test_model_names_match_the_networks() -> None:
    assert tuple(MODELS) == MODEL_NAMES


def test_train_result_repr_leaves_out_the_network() -> None:
    result = TrainResult(Path("runs/x"), 3, 1.0, None, method=nn.Sequential(nn.Linear(2, 2)))
    assert "Linear" not in repr(result) and "runs/x" in repr(result)


def test_demo_table_shows_figures_as_paths(tmp_path: Path) -> None:
    table = tmp_path / "demo_plan.md"
    table.write_text("| a |\n|---|\n\n![Dice by method](demo_plan_dice.png)\n")
    text = _terminal_text(table)
    assert "![" not in text and f"figure: Dice by method: {tmp_path / 'demo_plan_dice.png'}" in text


def test_interruption_exit_codes() -> None:
    assert RunInterrupted("x", "SIGINT").exit_code == 130
    assert RunInterrupted("x", "SIGTERM").exit_code == 143
    assert RunInterrupted("x", None).exit_code == 130


def test_interrupted_training_is_not_reported_as_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import crln.engine.trainer as trainer_module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise RunInterrupted("stopped by SIGINT after iteration 4; continue with --resume", "SIGINT")

    monkeypatch.setattr(trainer_module, "train", interrupted)
    assert main(["train", "demo", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == "crln: stopped by SIGINT after iteration 4; continue with --resume\n"


def test_plain_progress_lines_every_few_percent() -> None:
    stream = io.StringIO()
    bar = progress_bar(200, desc="crln", stream=stream)
    assert isinstance(bar, PlainProgress)  # a StringIO is not a terminal
    for _ in range(200):
        bar.set_postfix(loss="0.5000", refresh=False)
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20  # every 5 %
    assert lines[0].startswith("crln: iteration 10/200 (5%)  loss 0.5000  ") and "s/it  ETA " in lines[0]
    assert lines[-1].startswith("crln: iteration 200/200 (100%)") and lines[-1].endswith("ETA 0:00")


def test_plain_progress_of_a_resumed_run_and_a_short_one() -> None:
    stream = io.StringIO()
    bar = PlainProgress(3, initial=1, desc="", stream=stream)
    bar.update(1)
    bar.update(1)
    bar.close()
    firsts = [line.split("  ")[0] for line in stream.getvalue().splitlines()]
    assert firsts == ["iteration 2/3 (67%)", "iteration 3/3 (100%)"]
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_training_outside_a_terminal_logs_lines_and_val_every_0_never_validates(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "my runs"  # a space: the printed hint must stay one argument
    overrides = tiny_overrides(phantom_root, runs, **{"train.iterations": 4, "train.val_every": 0})
    assert main(["train", "demo", *overrides]) == 0  # progress on; pytest's stderr is not a terminal
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "supervised: iteration 4/4 (100%)" in captured.err
    run = runs / "phantom" / "supervised__vnet__demo" / "seed1337"
    hint = next(line for line in captured.out.splitlines() if line.startswith("next: "))
    assert shlex.split(hint[len("next: ") :]) == ["crln", "evaluate", str(run)]
    assert not (run / "checkpoint_best.pt").exists()  # data.validation=1 but train.val_every=0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records and not any("val_dice" in r for r in records)
