"""Untrusted files: crafted checkpoints never execute code, mismatched ones are refused with one line,
and YAML (presets, overrides, bench plans) is read with the safe loader."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_user_error, tiny_overrides
from crln.config import config_to_dict, load_config
from crln.engine.checkpoint import save_checkpoint
from crln.engine.run_folder import RunFolder
from crln.methods import method_for_run


class _RunsCommand:
    """Pickles as a call to ``os.system(command)``: what a malicious checkpoint would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def _config_and_state(phantom_root: Path, out: Path, **overrides: object) -> tuple[Any, dict[str, Any]]:
    config = load_config("demo", tiny_overrides(phantom_root, out, **overrides))
    method = method_for_run(config)
    state = {"method": config.method.name, "config": config_to_dict(config), "step": 0}
    return config, {**state, "method_state": method.state_dict()}


def _evil_checkpoints(folder: Path, marker: Path, phantom_root: Path) -> list[Path]:
    """The payload as torch's zip format (inside a valid-looking checkpoint) and as a bare pickle."""
    _, state = _config_and_state(phantom_root, folder / "runs")
    payload = _RunsCommand(f"touch {marker}")
    zipped = folder / "zipped.pt"
    torch.save({**state, "format_version": 1, "extra": payload}, zipped)
    bare = folder / "bare.pt"
    bare.write_bytes(pickle.dumps({"format_version": 1, "method_state": payload}))
    return [zipped, bare]


def test_crafted_pickles_never_run(phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    scan = next(phantom_root.rglob("*.h5"))
    for path in _evil_checkpoints(tmp_path, marker, phantom_root):
        assert_user_error(["evaluate", path, "--out", tmp_path / "eval"], capsys, path.name, "not a loadable")
        assert_user_error(["predict", path, scan, "-o", tmp_path / "pred"], capsys, path.name, "not a loadable")
        assert not marker.exists(), f"{path.name} executed code"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pred").exists()


def test_crafted_pickle_as_the_resumed_checkpoint(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    overrides = tiny_overrides(phantom_root, tmp_path / "runs")
    latest = RunFolder.for_config(load_config("demo", overrides)).checkpoint("latest")
    latest.parent.mkdir(parents=True)
    latest.write_bytes(_evil_checkpoints(tmp_path, marker, phantom_root)[0].read_bytes())
    assert_user_error(["train", "demo", *overrides, "--resume", "--no-progress"], capsys, "not a loadable")
    assert not marker.exists()


def _mismatched(phantom_root: Path, out: Path, case: str) -> dict[str, Any]:
    """A checkpoint whose contents contradict each other in one way."""
    _, state = _config_and_state(phantom_root, out)
    if case == "n_filters":  # weights of a wider network than the config builds
        state["method_state"] = _config_and_state(phantom_root, out, **{"model.n_filters": 8})[1]["method_state"]
    elif case == "num_classes":
        state["config"]["data"]["num_classes"] = 3
    elif case == "extra-weight":
        state["method_state"]["student.injected"] = torch.zeros(1)
    elif case == "missing-weight":
        state["method_state"].pop(next(iter(state["method_state"])))
    elif case == "method-name":
        state["method"] = "crln"
    elif case == "unknown-config-key":
        state["config"]["model"]["evil"] = 1
    elif case == "config-not-a-mapping":
        state["config"] = "model: vnet"
    elif case == "bad-config-value":
        state["config"]["data"]["patch_size"] = [30, 30, 30]
    return state


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("n_filters", "weights do not match the architecture of its config (size mismatch for student."),
        ("num_classes", "weights do not match the architecture of its config (size mismatch for student."),
        ("extra-weight", 'Unexpected key(s) in state_dict: "student.injected"'),
        ("missing-weight", "Missing key(s) in state_dict"),
        ("method-name", "method 'crln' but its config says method.name='supervised'"),
        ("unknown-config-key", "unknown config key model.evil"),
        ("config-not-a-mapping", "key 'config' is a str, expected a dict"),
        ("bad-config-value", "config key data.patch_size"),
    ],
)
def test_mismatched_checkpoints_are_refused(
    case: str, fragment: str, phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, _mismatched(phantom_root, tmp_path / "runs", case))
    out = tmp_path / "eval"
    assert_user_error(["evaluate", path, "--out", out, "--limit", "1"], capsys, f"checkpoint {path}", fragment)
    assert not out.exists()


def test_resume_refuses_weights_that_do_not_fit(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(phantom_root, tmp_path / "runs")
    latest = RunFolder.for_config(load_config("demo", overrides)).checkpoint("latest")
    save_checkpoint(latest, _mismatched(phantom_root, tmp_path / "runs", "n_filters"))
    argv = ["train", "demo", *overrides, "--resume", "--no-progress"]
    assert_user_error(argv, capsys, f"checkpoint {latest}: weights do not match the architecture")


# ----------------------------------------------------------------------------------------------------------
# YAML


def _python_tag(marker: Path) -> str:
    return f"!!python/object/apply:os.system ['touch {marker}']"


def test_yaml_presets_plans_and_overrides_are_safe(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    preset = tmp_path / "evil.yaml"
    preset.write_text(f"data:\n  name: {_python_tag(marker)}\n")
    assert_user_error(["train", preset, "--no-progress"], capsys, "evil.yaml: invalid YAML at line 2")
    assert_user_error(["config", preset], capsys, "invalid YAML")
    child = tmp_path / "child.yaml"
    child.write_text("base: evil.yaml\n")  # the base chain goes through the same loader
    assert_user_error(["config", child], capsys, "evil.yaml: invalid YAML")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"runs:\n  - name: x\n    config: {_python_tag(marker)}\n")
    assert_user_error(["bench", plan, "--dry-run"], capsys, "plan.yaml: invalid YAML")
    override = f"data.name={_python_tag(marker)}"
    assert_user_error(["config", "demo", override], capsys, "value is not valid YAML")
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_pickle_through_the_real_command(phantom_root: Path, tmp_path: Path) -> None:
    """The console contract end to end (torch may warn on foreign pickles: still one stderr line)."""
    marker = tmp_path / "pwned"
    bare = _evil_checkpoints(tmp_path, marker, phantom_root)[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "crln", "evaluate", str(bare)], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("crln: error: checkpoint") and "not a loadable crln checkpoint" in lines[0]
    assert not marker.exists()
