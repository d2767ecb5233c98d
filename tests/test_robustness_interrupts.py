"""Killed and interrupted runs: checkpoints are never corrupt and --resume finishes the run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from crln.engine.checkpoint import load_checkpoint

ITERATIONS = 120


def _start(phantom_root: Path, out: Path, resume: bool) -> subprocess.Popen[str]:
    overrides = tiny_overrides(
        phantom_root,
        out,
        **{"train.iterations": ITERATIONS, "train.checkpoint_every": 5, "data.validation": 0, "train.log_every": 5},
    )
    cmd = [sys.executable, "-m", "crln", "train", "demo", *overrides, "--no-progress"]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_dir(out: Path) -> Path:
    return out / "phantom" / "supervised__vnet__demo" / "seed1337"


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoint_latest.pt").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint appeared: {proc.communicate()[1][-500:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(phantom_root: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    run = _run_dir(tmp_path)
    for attempt in range(3):
        proc = _start(phantom_root, tmp_path, resume=(run / "checkpoint_latest.pt").exists())
        _wait_for_checkpoint(run, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in training, possibly mid-write of a checkpoint
        proc.kill()
        proc.wait()
        state = load_checkpoint(run / "checkpoint_latest.pt")  # never corrupt
        assert 0 < state["step"] <= ITERATIONS, attempt
    proc = _start(phantom_root, tmp_path, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-1000:]
    assert load_checkpoint(run / "checkpoint_final.pt")["step"] == ITERATIONS
    assert not list(run.glob(".*.tmp*")), "temp files of killed writers are cleaned up on resume"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(phantom_root: Path, tmp_path: Path, sig: signal.Signals) -> None:
    run = _run_dir(tmp_path)
    proc = _start(phantom_root, tmp_path, resume=False)
    _wait_for_checkpoint(run, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + sig, err  # an interruption, not an error: 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in err and "error" not in err
    assert err.startswith(f"crln: stopped by {sig.name}") and "--resume" in err
    step = int(err.split("after iteration ")[1].split(";")[0])
    assert load_checkpoint(run / "checkpoint_latest.pt")["step"] == step
