from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from crln.atomic import atomic_write_text
from crln.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from crln.engine.schedule import lr_factor, poly_lr_factor
from crln.errors import CrlnError
from crln.methods.ema import ema_decay_at, ema_update
from crln.methods.ramps import sigmoid_rampup


def test_ema_update_moves_teacher_towards_student() -> None:
    torch.manual_seed(0)
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    nn.init.constant_(student.weight, 2.0)
    nn.init.constant_(teacher.weight, 0.0)
    student.running_mean.fill_(4.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, decay=0.75)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.5))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 1.0))
    assert int(teacher.num_batches_tracked) == 7
    assert all(p.grad is None for p in teacher.parameters())


def test_ema_warmup() -> None:
    assert ema_decay_at(0, 0.99) == 0.0  # the first update copies the student
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_schedules() -> None:
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(50, 100, 1.0) == pytest.approx(0.5)
    assert poly_lr_factor(100, 100) == 0.0
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    # UA-MT's step decay: ÷10 after 2,500 iterations (0-based step 2500 is the first at 0.1×).
    step = [lr_factor(s, 6000, "step", power=0.9, step_size=2500, gamma=0.1) for s in (0, 2499, 2500, 5000)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lr_factor(50, 100, "poly", power=1.0, step_size=1, gamma=0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule must be one of poly, step"):
        lr_factor(0, 10, "cosine", power=0.9, step_size=1, gamma=0.1)


def _state() -> dict:
    return {"method": "supervised", "config": {"data": {}}, "step": 3, "method_state": {"w": torch.ones(2)}}


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state())
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION
    assert state["step"] == 3 and torch.equal(state["method_state"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"format_version": 1, "payload": Evil()}, handle)
    with pytest.raises(CrlnError, match="not a loadable crln checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_corrupt_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CrlnError, match=r"bad\.pt"):
        load_checkpoint(path)


def test_wrong_version_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({**_state(), "format_version": 99}, path)
    with pytest.raises(CrlnError, match="format version 99"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(CrlnError, match="expected keys"):
        load_checkpoint(path)
    with pytest.raises(CrlnError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state())
    before = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CrlnError, match="No space left"):
        save_checkpoint(path, _state())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_text(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"


def test_trainer_follows_the_step_schedule(phantom_root: Path, tmp_path: Path) -> None:
    from conftest import tiny_overrides
    from crln.config import load_config
    from crln.engine.run_folder import read_log
    from crln.engine.trainer import train

    extra = {"method.name": "supervised", "optim.lr": 0.01, "optim.lr_schedule": "step"}
    extra |= {"optim.lr_step_size": 2, "optim.lr_step_gamma": 0.5, "data.patch_size": "[32,32,16]"}
    run = train(load_config("demo", tiny_overrides(phantom_root, tmp_path, **extra)), progress=False).run_dir
    lrs = [r["lr"] for r in read_log(run / "log.jsonl") if "loss" in r]
    assert lrs == pytest.approx([0.01, 0.005, 0.0025])  # the lr of 0-based steps 1, 3 and 5
