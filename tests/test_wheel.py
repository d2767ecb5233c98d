"""The built wheel works on its own: presets inside it, run from a fresh virtual environment outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.slow

# What a wheel build reads from the checkout (pyproject names README.md and LICENSE).
_BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the checkout, so the build leaves nothing (build/, *.egg-info) in the repo."""
    source = tmp_path / "source"
    source.mkdir()
    for name in _BUILD_INPUTS:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, source / name)
    shutil.rmtree(source / "src" / "crln.egg-info", ignore_errors=True)
    wheels = tmp_path / "wheels"
    # No network: setuptools comes from this environment, crln's dependencies are not needed to build.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(source)], source
    )
    (wheel,) = wheels.glob("crln-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment holding only the wheel; its dependencies (torch, ...) are borrowed from
    this environment's site-packages through a ``.pth`` line, whose own ``.pth`` files (among them the
    editable install of the checkout) are then not processed."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    )
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    return venv


def test_wheel_ships_presets_and_trains_from_a_fresh_venv_outside_the_repo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(Path(n).stem for n in names if n.startswith("crln/configs/") and n.endswith(".yaml"))
    assert presets == sorted(p.stem for p in (REPO_ROOT / "src" / "crln" / "configs").glob("*.yaml"))

    venv = _fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = _run([str(venv / "bin" / "python"), "-c", "import crln; print(crln.__file__)"], outside, env)
    assert Path(where.strip()).is_relative_to(venv), f"crln imported from {where.strip()}, not from the venv"

    crln = str(venv / "bin" / "crln")
    assert "name: LA" in _run([crln, "config", "la"], outside, env)
    _run(
        [crln, "data", "phantom", "--dst", "phantom", "--train", "6", "--test", "2", "--shape", "48,48,32"],
        outside,
        env,
    )
    overrides = tiny_overrides(outside / "phantom", outside / "runs", **{"train.iterations": 2})
    _run([crln, "train", "demo", *overrides, "--run-dir", "run", "--no-progress"], outside, env)
    assert (outside / "run" / "model_final.pt").is_file()
