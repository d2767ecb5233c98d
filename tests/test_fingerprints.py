"""Behaviour fingerprints: a refactor of the engine must leave training bit-for-bit where it was.

Each method trains 6 iterations on phantoms (CRLN with its rectification and CPS switched on from the
start, BCP with a 2-iteration pre-training stage); the fingerprint is the logged losses and a few sums
of the final weights, rounded so that only a change of behaviour, not float noise, moves them. One
more run is interrupted after iteration 3 and resumed. The expected values were recorded before the
engine refactor of issue #17; when a deliberate change of behaviour moves them, record them again
with ``python tests/test_fingerprints.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, train_interrupted
from crln.config import load_config
from crln.engine.checkpoint import load_checkpoint
from crln.engine.run_folder import read_log
from crln.engine.trainer import train

EXPECTED_PATH = Path(__file__).with_name("fingerprints.json")

METHOD_OVERRIDES: dict[str, list[str]] = {
    "supervised": ["method.name=supervised"],
    "mean_teacher": ["method.name=mean_teacher"],
    "ua_mt": ["method.name=ua_mt"],
    "crln": ["method.name=crln", "method.rectify_start=0"],
    "bcp": ["method.name=bcp", "method.pretrain_iterations=2"],
}


def _fingerprint(run: Path) -> dict[str, object]:
    """Losses of every logged window and sums of the final weights, rounded to 5 significant digits."""
    state = load_checkpoint(run / "checkpoint_final.pt")["method_state"]
    tensors = [v.double() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    losses = [r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r]
    generator = torch.Generator().manual_seed(0)
    # A fixed random projection of every weight: any change to any element moves it, unlike the sums.
    projection = sum(float(t.flatten() @ torch.randn(t.numel(), generator=generator, dtype=t.dtype)) for t in tensors)
    return {
        "losses": [float(f"{x:.5g}") for x in losses],
        "weight_projection": float(f"{projection:.5g}"),
        "weight_sum": float(f"{sum(float(t.sum()) for t in tensors):.5g}"),
        "weight_sq": float(f"{sum(float((t * t).sum()) for t in tensors):.5g}"),
        "n_tensors": len(tensors),
    }


def _overrides(phantom_root: Path, out: Path, name: str) -> list[str]:
    return [*tiny_overrides(phantom_root, out), *METHOD_OVERRIDES[name], f"train.tag={name}"]


def _run(phantom_root: Path, out: Path, name: str) -> dict[str, object]:
    return _fingerprint(train(load_config("demo", _overrides(phantom_root, out, name)), progress=False).run_dir)


def _resumed(phantom_root: Path, out: Path) -> dict[str, object]:
    config = load_config("demo", _overrides(phantom_root, out, "crln"))
    train_interrupted(config, after=3)
    return _fingerprint(train(config, resume=True, progress=False).run_dir)


@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_training_fingerprint_is_unchanged(phantom_root: Path, tmp_path: Path, name: str) -> None:
    expected = json.loads(EXPECTED_PATH.read_text())[name]
    assert _run(phantom_root, tmp_path, name) == expected


def test_resumed_crln_fingerprint_is_unchanged(phantom_root: Path, tmp_path: Path) -> None:
    expected = json.loads(EXPECTED_PATH.read_text())["crln_resumed"]
    assert _resumed(phantom_root, tmp_path) == expected


if __name__ == "__main__":  # record the expected fingerprints (only after a deliberate change of behaviour)
    import tempfile

    from crln.data.phantom import write_phantom_h5_dataset

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom_h5_dataset(Path(tmp) / "phantom", n_train=8, n_test=2, shape=(48, 48, 32), seed=0)
        found = {name: _run(root, Path(tmp) / "runs", name) for name in sorted(METHOD_OVERRIDES)}
        found["crln_resumed"] = _resumed(root, Path(tmp) / "resumed")
    EXPECTED_PATH.write_text(json.dumps(found, indent=1) + "\n")
    sys.stdout.write(json.dumps(found, indent=1) + "\n")
