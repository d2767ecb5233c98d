"""The Python API: every public name resolves, importing crln stays light, and docs/api.md's example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import crln
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
