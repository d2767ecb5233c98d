"""Shared fixtures: small phantom datasets, the real LA folder when present, tiny configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from crln.engine.callbacks import Callback

REPO_ROOT = Path(__file__).resolve().parents[1]
LA_ROOT = REPO_ROOT.parent / "shared" / "data" / "LA"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def la_root() -> Path:
    """The real Left Atrium h5 dataset; skips when this checkout has none beside it."""
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"real LA data not found at {LA_ROOT} (../shared/data/LA relative to the repo root)")
    return LA_ROOT


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic h5 dataset (8 train + 2 test phantoms of 48×48×32), written once per session."""
    from crln.data.phantom import write_phantom_h5_dataset

    root = tmp_path_factory.mktemp("phantom")
    return write_phantom_h5_dataset(root, n_train=8, n_test=2, shape=(48, 48, 32), seed=0)


def tiny_overrides(data_root: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides that make a run take seconds on a CPU: small VNet, small patch, few iterations."""
    values = {
        "data.root": str(data_root),
        "data.name": "phantom",
        "data.labeled": 3,
        "data.validation": 1,
        "data.patch_size": "[32,32,32]",
        "data.labeled_batch_size": 2,
        "data.unlabeled_batch_size": 2,
        "data.num_workers": 0,
        "data.pin_memory": "false",
        "model.n_filters": 4,
        "train.iterations": 6,
        "train.log_every": 2,
        "train.checkpoint_every": 3,
        "train.output_dir": str(output_dir),
        "eval.stride": "[16,16,16]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class InterruptAt(Callback):
    """A training callback that raises KeyboardInterrupt when iteration ``after`` + 1 of this call starts.

    The loop is killed from inside, before that iteration fetches its batch, so the last checkpoint
    written by the checkpoint cadence is what a resume continues from.
    """

    def __init__(self, after: int) -> None:
        self.after, self.started = after, 0

    def on_step_start(self, run: object, step: int) -> None:
        self.started += 1
        if self.started == self.after + 1:
            raise KeyboardInterrupt


def train_interrupted(config: object, after: int) -> None:
    """Run ``train(config)`` and kill it (KeyboardInterrupt) when iteration ``after`` + 1 starts."""
    from crln.engine.trainer import train

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, callbacks=[InterruptAt(after)])  # type: ignore[arg-type]


def assert_user_error(
    argv: list[object], capsys: pytest.CaptureFixture[str], *fragments: str, exit_code: int | None = None
) -> str:
    """Run ``crln.cli.main(argv)`` in-process and check the user-error contract; returns the message line.

    Exit code 2 (or ``exit_code``: 3 for a diverged run), exactly one stderr line starting ``crln: error:``,
    no traceback, every fragment in it, and no warning on the way (outside pytest a warning would be more stderr lines).
    """
    import warnings

    from crln.cli import EXIT_USER_ERROR, main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == (EXIT_USER_ERROR if exit_code is None else exit_code), err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("crln: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def poison_supervised_step(monkeypatch: pytest.MonkeyPatch, at_step: int, change: Callable[[dict], None]) -> None:
    """Let ``change(out)`` alter the supervised baseline's loss terms of (0-based) iteration ``at_step``: a
    divergence made to order."""
    from crln.methods.supervised import Supervised

    original = Supervised.train_step

    def poisoned(self: Supervised, batch: object, step: int) -> dict[str, torch.Tensor]:
        out = original(self, batch, step)
        if step == at_step:
            change(out)
        return out

    monkeypatch.setattr(Supervised, "train_step", poisoned)
