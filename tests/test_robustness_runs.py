"""Failing runs: a writer killed mid-checkpoint, a full disk, a diverging loss, fp16 overflow.

Random SIGKILLs during training and SIGINT/SIGTERM are in ``test_robustness_interrupts.py``; this
file kills the process at a chosen moment (inside a checkpoint write) and drives the rest in-process.
"""

from __future__ import annotations

import inspect
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_user_error, poison_supervised_step, tiny_overrides
from crln.cli import main
from crln.config import load_config
from crln.engine.checkpoint import load_checkpoint, save_checkpoint
from crln.engine.run_folder import MetricsLog, RunFolder
from crln.errors import EXIT_DIVERGED, CrlnError
from crln.methods.supervised import Supervised

ITERATIONS = 6
CHECKPOINT_EVERY = 2
KILLED_EXIT = 137  # what a shell reports for SIGKILL
# What torch's zip writer raises when the disk fills up (seen on a 64 KiB tmpfs).
TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _overrides(phantom_root: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "train.iterations": ITERATIONS,
        "train.checkpoint_every": CHECKPOINT_EVERY,
        "data.validation": 0,
        **extra,
    }
    return tiny_overrides(phantom_root, out, **values)


def _run_dir(overrides: list[str]) -> Path:
    return RunFolder.for_config(load_config("demo", overrides)).path


def _temp_files(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp*"))


def _weights_finite(state: dict[str, Any]) -> bool:
    return all(torch.isfinite(v).all() for v in state["method_state"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------------
# killed while writing a checkpoint


_DIE_IN_SECOND_SAVE = """
import os, sys, torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 2:  # half a file, then gone: no finally, no cleanup, as with SIGKILL
        with open(f, "wb") as handle:
            handle.write(b"PK\\x03\\x04 half a checkpoint")
        os._exit({code})
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from crln.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_inside_a_checkpoint_write_then_resume(phantom_root: Path, tmp_path: Path) -> None:
    overrides = _overrides(phantom_root, tmp_path)
    run = _run_dir(overrides)
    script = _DIE_IN_SECOND_SAVE.format(code=KILLED_EXIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", script, "train", "demo", *overrides, "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == KILLED_EXIT, proc.stderr[-2000:]
    assert len(_temp_files(run)) == 1, "the killed writer left its half-written temp file"
    assert load_checkpoint(run / "checkpoint_latest.pt")["step"] == CHECKPOINT_EVERY  # the previous one, intact

    assert main(["train", "demo", *overrides, "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint_final.pt")["step"] == ITERATIONS
    assert _temp_files(run) == []


# ----------------------------------------------------------------------------------------------------------
# full disk


def test_full_disk_during_training_keeps_the_previous_checkpoint(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _overrides(phantom_root, tmp_path)
    run = _run_dir(overrides)
    real_save, calls = torch.save, []

    def save_until_full(obj: object, f: Any, *args: object, **kwargs: object) -> None:
        calls.append(f)
        if len(calls) >= 2:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError(TORCH_WRITE_FAILURE)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    latest = run / "checkpoint_latest.pt"
    argv = ["train", "demo", *overrides, "--no-progress"]
    assert_user_error(argv, capsys, f"cannot write {latest}", "MiB free", "the previous file is kept")
    assert load_checkpoint(latest)["step"] == CHECKPOINT_EVERY
    assert _temp_files(run) == [] and not (run / "checkpoint_final.pt").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues where it stopped
    assert main(["train", "demo", *overrides, "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint_final.pt")["step"] == ITERATIONS


def test_a_real_failed_write_becomes_a_clear_error(tmp_path: Path) -> None:
    """A kernel-level write failure (a file-size limit, as a full disk would) inside torch's writer."""
    limit = 1 << 20
    path = tmp_path / "ckpt.pt"
    state = {"method": "supervised", "config": {}, "step": 1, "method_state": {"w": torch.ones(8)}}
    save_checkpoint(path, state)
    before = path.read_bytes()
    too_big = {**state, "step": 2, "method_state": {"w": torch.ones(limit)}}  # 4 MiB of weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CrlnError, match=r"cannot write .*ckpt\.pt: write failed .*; the previous file is kept"):
            save_checkpoint(path, too_big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_failed_log_write_is_a_clear_error(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "log.jsonl")
    log.write({"step": 1, "loss": 0.5})
    (tmp_path / "log.jsonl").unlink()
    (tmp_path / "log.jsonl").mkdir()  # any OSError on append: a full disk, a vanished folder
    with pytest.raises(CrlnError, match=r"cannot write .*log\.jsonl"):
        log.write({"step": 2, "loss": 0.4})


# ----------------------------------------------------------------------------------------------------------
# a diverging run


def test_non_finite_loss_stops_naming_the_term_and_iteration(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _overrides(phantom_root, tmp_path)
    run = _run_dir(overrides)

    def dice_overflows(out: dict[str, torch.Tensor]) -> None:
        out["loss_dice"] = torch.full_like(out["loss_dice"], float("inf"))
        out["loss"] = out["loss"] + out["loss_dice"]

    poison_supervised_step(monkeypatch, 4, dice_overflows)
    argv = ["train", "demo", *overrides, "--no-progress"]
    message = ("training diverged: loss term 'loss_dice' is inf", "at iteration 5", "last good")
    assert_user_error(argv, capsys, *message, exit_code=EXIT_DIVERGED)
    kept = load_checkpoint(run / "checkpoint_latest.pt")
    assert kept["step"] == 4 and _weights_finite(kept)
    assert not (run / "checkpoint_final.pt").exists()


def test_non_finite_weights_are_never_checkpointed(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loss of an iteration can be finite while its update overflows the weights: the checkpoint
    due right after must not be written."""
    overrides = _overrides(phantom_root, tmp_path)
    run = _run_dir(overrides)
    original = Supervised.after_optimizer_step

    def weights_overflow(self: Supervised, step: int) -> None:
        original(self, step)
        if step == 3:
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Supervised, "after_optimizer_step", weights_overflow)
    argv = ["train", "demo", *overrides, "--no-progress"]
    message = ("training diverged: weight 'student.", "is not finite after iteration 4")
    assert_user_error(argv, capsys, *message, exit_code=EXIT_DIVERGED)
    kept = load_checkpoint(run / "checkpoint_latest.pt")
    assert kept["step"] == CHECKPOINT_EVERY and _weights_finite(kept)


def test_a_divergence_carries_its_iteration_for_callers_that_record_it() -> None:
    # crln bench records the iteration (diverged.json) from this field, not by parsing the message.
    from crln.engine.state import _check_finite_weights
    from crln.engine.trainer import _check_finite
    from crln.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="at iteration 5;") as loss:
        _check_finite({"loss": torch.tensor(float("inf"))}, 4)  # 0-based step 4: the 5th iteration
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="after iteration 4;") as weights:
        _check_finite_weights(layer, 4)  # checked after 4 iterations
    assert (loss.value.iteration, weights.value.iteration) == (5, 4)


def test_fp16_gradient_overflow_is_skipped_by_the_scaler(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss whose scaled gradients overflow fp16 makes the scaler skip that step and lower its
    scale; the run goes on with finite weights (without the scaler the weights would become NaN)."""
    overflow_factor = 1e20  # finite in fp32, far beyond fp16's 65504 once back-propagated
    overrides = _overrides(
        phantom_root,
        tmp_path,
        **{
            "train.amp": "fp16",
            "train.device": "cpu",
            "train.iterations": 3,
            "data.patch_size": "[16,16,16]",  # fp16 convolutions are slow on a CPU
            "eval.stride": "[16,16,16]",
        },
    )

    def scaled_up(out: dict[str, torch.Tensor]) -> None:
        out["loss"] = out["loss"] * overflow_factor

    poison_supervised_step(monkeypatch, 0, scaled_up)
    assert main(["train", "demo", *overrides, "--no-progress"]) == 0
    final = load_checkpoint(_run_dir(overrides) / "checkpoint_final.pt")
    initial_scale = inspect.signature(torch.amp.GradScaler).parameters["init_scale"].default
    assert final["scaler"]["scale"] < initial_scale
    assert _weights_finite(final)
