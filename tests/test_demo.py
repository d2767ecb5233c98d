"""The demo's phantom task (labelled cases from a narrow slice) and the README table kept current."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from crln.data.phantom import NARROW, WIDE, make_phantom
from crln.demo import DEMO_METHODS, demo_fingerprint, write_demo_data

ROOT = Path(__file__).resolve().parents[1]


def _between(text: str, marker: str) -> str:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert begin in text and end in text, f"markers {begin} / {end} missing"
    return text[text.index(begin) : text.index(end)]


def _rows(block: str) -> list[str]:
    return [line for line in block.splitlines() if re.match(r"\| [^|]+ \| final \| \d+ \|", line)]


def test_readme_demo_table_is_the_recorded_output_of_the_current_demo() -> None:
    """README rows = RESULTS.md's measured rows, measured with today's preset, plan and phantoms.

    On failure, re-run ``python benchmarks/demo_seeds.py --write`` (about 3 times the demo's time).
    """
    results = _between((ROOT / "benchmarks" / "RESULTS.md").read_text(), "demo-seeds")
    readme_block = _between((ROOT / "README.md").read_text(), "demo-table")
    readme = _rows(readme_block)
    recorded = re.search(r"Demo fingerprint `([0-9a-f]+)`", results)
    assert recorded, "benchmarks/RESULTS.md's demo section records no fingerprint"
    assert recorded.group(1) == demo_fingerprint(), "the demo changed since its table was measured"
    assert [row.split("|")[1].strip() for row in readme] == list(DEMO_METHODS)
    tables = [line for line in readme_block.splitlines() if line.startswith("|")]
    assert all(line in results.splitlines() for line in tables), "README's demo table differs from RESULTS.md's"


def test_wide_phantoms_vary_more_than_narrow_ones() -> None:
    shape = (32, 32, 24)
    sizes = {style: [int(make_phantom(s, shape, 2, style).label.sum()) for s in range(8)] for style in (NARROW, WIDE)}
    assert np.ptp(sizes[WIDE]) > 2 * np.ptp(sizes[NARROW])


def test_demo_data_labelled_cases_narrow_and_rewritten_when_stale(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_demo_data(root, n_train=3, n_test=1, labelled=1)
    stamp = json.loads((root / "demo_data.json").read_text())
    assert stamp["narrow_first"] == 1 and (root / "train.list").read_text().count("\n") == 3
    first = (root / "data" / "case_000.h5").stat().st_mtime_ns
    write_demo_data(root, n_train=3, n_test=1, labelled=1)  # same spec: kept
    assert (root / "data" / "case_000.h5").stat().st_mtime_ns == first
    (root / "data" / "stale.h5").write_bytes(b"")
    write_demo_data(root, n_train=2, n_test=1, labelled=1)  # other spec: replaced, old cases gone
    assert not (root / "data" / "stale.h5").exists()
    assert (root / "train.list").read_text().split() == ["case_000", "case_001"]
