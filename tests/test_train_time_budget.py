"""``train(time_budget_s=...)`` / ``crln train --time-budget-s``: stop on a checkpoint, exit 0, resume exactly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.engine.checkpoint import load_checkpoint

ITERATIONS = 4
CLOCK_TICK_S = 1.0
# With a clock that advances one tick per reading (the budget's start, then each iteration's start and check):
# iteration 1 ends at t=2 (warm-up, not counted as the slowest), iteration 2 at t=4 with slowest = 1 tick,
# so the check 5 + 1 > 4.5 stops the run after iteration 2.
BUDGET_S = 4.5
STOPPED_AFTER = 2


class _TickingClock:
    """Stands in for the ``time`` module of the time-budget callback: ``monotonic`` advances one tick per call."""

    def __init__(self) -> None:
        self.now = -CLOCK_TICK_S
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        self.now += CLOCK_TICK_S
        return self.now


def _config(data_root: Path, output_dir: Path):
    overrides = tiny_overrides(data_root, output_dir, **{"train.iterations": ITERATIONS, "data.validation": 0})
    return load_config("demo", overrides)


def test_budget_stops_on_a_checkpoint_and_resume_matches_a_straight_run(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crln.engine.callbacks as callbacks_module
    import crln.engine.trainer as trainer_module

    straight = trainer_module.train(_config(phantom_root, tmp_path / "straight"), progress=False)
    assert straight.complete and straight.steps == ITERATIONS

    config = _config(phantom_root, tmp_path / "chunked")
    with monkeypatch.context() as patch:
        patch.setattr(callbacks_module, "time", _TickingClock())
        first = trainer_module.train(config, progress=False, time_budget_s=BUDGET_S)
    assert not first.complete and first.steps == STOPPED_AFTER
    assert load_checkpoint(first.run_dir / "checkpoint_latest.pt")["step"] == STOPPED_AFTER
    assert not (first.run_dir / "checkpoint_final.pt").exists()

    # a budget larger than what is left lets the resumed run finish
    second = trainer_module.train(config, resume=True, progress=False, time_budget_s=3600)
    assert second.complete and second.steps == ITERATIONS
    a = load_checkpoint(straight.run_dir / "checkpoint_final.pt")["method_state"]
    b = load_checkpoint(second.run_dir / "checkpoint_final.pt")["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reports_an_incomplete_run_and_exits_0(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import crln.engine.callbacks as callbacks_module

    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.iterations": ITERATIONS, "data.validation": 0})
    monkeypatch.setattr(callbacks_module, "time", _TickingClock())
    code = main(["train", "demo", *overrides, "--no-progress", "--evaluate", "--time-budget-s", str(BUDGET_S)])
    out = capsys.readouterr().out
    assert code == 0
    expected = f"run incomplete: the time budget ({BUDGET_S:g} s) stopped it after iteration {STOPPED_AFTER} of"
    assert f"{expected} {ITERATIONS}" in out
    assert "--resume" in out and "Dice" not in out  # an incomplete run is not evaluated
    assert main(["train", "demo", *overrides, "--time-budget-s", "0"]) == 2
