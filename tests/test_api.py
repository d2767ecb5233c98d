"""The Python API: every public name resolves, importing crln stays light, and docs/api.md's example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crln
from conftest import tiny_overrides
from crln import CrlnError, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_public_name_resolves_to_what_its_module_defines() -> None:
    for name in crln.__all__:
        assert getattr(crln, name) is not None, name
    assert crln.train.__module__ == "crln.engine.trainer" and crln.Predictor.__module__ == "crln.predictor"


def test_importing_crln_loads_no_torch() -> None:
    code = "import sys, crln; crln.load_config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_documented_example_runs() -> None:
    (example,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    exec(compile(example, str(DOC), "exec"), {})


def test_a_config_error_from_python_is_a_crln_error() -> None:
    """A negative train.iterations names that key (not an AttributeError of a method without pretraining)."""
    with pytest.raises(CrlnError, match=r"train\.iterations: expected an integer >= 1, got -1"):
        load_config("demo", ["train.iterations=-1"])
    with pytest.raises(CrlnError, match=r"overrides: expected a list of key=value strings"):
        load_config("demo", "train.iterations=4")  # type: ignore[arg-type]


def test_train_leaves_the_process_torch_settings_as_it_found_them(phantom_root: Path, tmp_path: Path) -> None:
    """A notebook's next run (or its own code) gets the thread count and kernels it had before train()."""
    threads = torch.get_num_threads()
    extra = {"train.iterations": 2, "train.threads": threads + 1, "train.deterministic": "true"}
    crln.train(crln.load_config("demo", tiny_overrides(phantom_root, tmp_path, **extra)), progress=False)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_crln_train_evaluate_keeps_train_threads_for_its_evaluation(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI is one command: train.threads holds for --evaluate after the training too."""
    import crln.evaluation
    from crln.cli import main

    threads, seen = torch.get_num_threads(), []

    def fake_evaluate(*args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        raise CrlnError("evaluation skipped")

    monkeypatch.setattr(crln.evaluation, "evaluate", fake_evaluate)
    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.iterations": 2, "train.threads": threads + 1})
    assert main(["train", "demo", *overrides, "--no-progress", "--evaluate"]) == 2
    assert seen == [threads + 1] and torch.get_num_threads() == threads


def test_the_report_leaves_the_users_matplotlib_alone() -> None:
    """Importing and drawing the report's figures keeps a notebook's backend and its open figures."""
    code = (
        "import matplotlib.pyplot as plt, numpy as np, crln, tempfile, pathlib\n"
        "plt.figure()\n"
        "crln.build_report\n"
        "from crln.report.figures import plot_slice_overlay\n"
        "image = np.zeros((8, 8, 8), np.float32); pred = np.zeros((8, 8, 8), np.uint8); pred[2:5, 2:5, 2:5] = 1\n"
        "plot_slice_overlay(image, None, pred, pred.astype(np.float32), pathlib.Path(tempfile.mkdtemp()) / 'o.png')\n"
        "print(plt.get_backend(), plt.get_fignums())\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["svg", "[1]"]
