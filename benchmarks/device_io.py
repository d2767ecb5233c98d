"""What the lent-GPU scripts share: the call's clock, the carried wheels and data, lines printed as they come.

A device call runs one command of at most 600 s in a bare machine whose ``/tmp`` survives only while
it stays warm. The working tree travels with each call, plus at most 64 MiB of git-ignored files:
the two packages the device image lacks (``data/wheels``) and the compact LA copy in parts
(``data/LA_compact/part*``). :func:`stage_data` merges whatever parts came into ``/tmp/crln/data``,
so parts carried by earlier calls of a warm machine add up. Used by ``gpu_check.py`` and
``gpu_reproduce.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["REPO", "STARTED", "WORK", "Echo", "TransferError", "import_crln", "install_wheels", "stage_data"]

STARTED = time.monotonic()  # the call's clock: the device's 600 s count from (about) here
REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/crln")


class TransferError(Exception):
    """A missing or corrupt piece, a bad argument: printed as one line, exit code 2."""


def install_wheels(wheels: Path, site: Path) -> None:
    """Install the carried wheels into ``site`` once per machine (no index, no dependencies)."""
    marker = site / ".installed"
    if marker.is_file() or not wheels.is_dir() or not list(wheels.glob("*.whl")):
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--target", str(site), *map(str, sorted(wheels.glob("*.whl")))]
    subprocess.run(command, check=True)
    marker.write_text("ok\n")


def import_crln(site: Path) -> None:
    """Put the working tree's ``src`` and the installed wheels on ``sys.path`` and import the engine."""
    for path in (str(REPO / "src"), str(site)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import crln.engine.trainer
        import crln.evaluation  # noqa: F401
    except ImportError as err:
        raise TransferError(
            f"cannot import crln ({err}); carry data/wheels (monai, nibabel) in this call, see docs/reproduce.md"
        ) from None


def stage_data(data_src: Path, target: Path) -> dict[str, Any]:
    """Merge the carried compact folder or its ``part*`` folders into ``target``; say what is there now.

    Returns:
        ``{"root", "complete", "cases", "lists": {name: {"listed": n, "present": [ids]}}, "line"}``;
        ``root`` is None while nothing was ever staged.
    """
    from crln.data.compact import MANIFEST_NAME, merge_compact, read_manifest
    from crln.data.h5 import read_case_list

    sources = [p for p in [data_src, *sorted(data_src.glob("part*"))] if (p / MANIFEST_NAME).is_file()]
    if sources:
        merge_compact(sources, target)
    if not (target / MANIFEST_NAME).is_file():
        return {"root": None, "complete": False, "cases": 0, "lists": {}, "line": f"data: nothing staged in {target}"}
    manifest = read_manifest(target)
    lists = {}
    for name in manifest["lists"]:
        ids = read_case_list(target, name)
        lists[Path(name).stem] = {"listed": len(ids), "present": [i for i in ids if i in manifest["cases"]]}
    counts = ", ".join(f"{name} {len(v['present'])}/{v['listed']}" for name, v in lists.items())
    state = "complete" if manifest["complete"] else "incomplete (carry the other parts)"
    return {
        "root": str(target),
        "complete": bool(manifest["complete"]),
        "cases": len(manifest["cases"]),
        "lists": lists,
        "line": f"data: {target} holds {len(manifest['cases'])} cases ({counts}), {state}",
    }


class Echo(list):
    """Lines printed as they come (a device call killed at its limit still shows how far it got)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def extend(self, lines: Any) -> None:
        for line in lines:
            self.append(line)
