"""benchmarks/gpu_check.py on the CPU: the dry run goes through every part of the GPU acceptance run,
and the budget, the data it got and the report behave as on a lent device."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check as check

PARTS = ["environment", "cuda_tests", "step_times", "step_times_compiled", "data_path", "inference", "crln_run"]


def test_dry_run_goes_through_every_part_and_reports_each(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a generous budget: a shared, loaded CPU must not turn a slow part into a skipped one
    code = check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--budget-s", "3600"])
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == PARTS
    statuses = {name: (p["status"], p.get("reason"), p.get("tail")) for name, p in parts.items()}
    assert code == 0 and all(p["status"] == "ok" for p in parts.values()), statuses
    assert parts["environment"]["data"]["lists"] == {"train": "6/6", "test": "2/2"}
    assert parts["cuda_tests"]["counts"]["skipped"] >= 1  # no CUDA here: every cuda test skips with a reason
    rows = parts["step_times"]["rows"]
    assert {(r["method"], r["variant"]) for r in rows} == {
        (m, v) for m in check.METHODS for v in ("fp32", "bf16", "bf16 + channels-last")
    }
    assert all(r["median_s"] > 0 and r["resident_mib"] > 0 for r in rows)
    assert all(r["ratio_to_mean_teacher"] == 1.0 for r in rows if r["method"] == "mean_teacher")
    assert [r["variant"] for r in parts["step_times_compiled"]["rows"]] == ["bf16 + channels-last + compile"]
    assert [r["workers"] for r in parts["data_path"]["rows"]] == [0, 1]
    assert set(parts["inference"]["seconds_per_volume"]) == {"fp32", "bf16 + channels-last"}
    run = parts["crln_run"]
    assert run["iterations"] == run["of"] == 3 and run["evaluation"]["cases"] == 2
    assert run["seconds_per_iteration"] > 0 and 0 <= run["data_wait_fraction"] <= 1
    page = (out / "gpu_check.md").read_text()
    assert page.startswith("# GPU check (dry run on CPU)") and all(f"## {name}: ok" in page for name in PARTS)


def test_a_part_past_the_budget_is_stopped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import crln  # noqa: F401  (the report writes through crln.atomic)

    clock = check.Clock(time.monotonic() - check.STARTED + 600.0)
    report = check.Report(tmp_path, check.DRY_RUN, 600.0, dry_run=True)
    result = check._run_part(report, "slow", lambda: time.sleep(30) or {}, clock, 1.0)  # its share: 1 s
    assert result["status"] == "failed" and "alarm after 1 s" in result["reason"] and result["seconds"] < 10
    monkeypatch.setattr(check, "GRACE_S", 0.0)
    clock = check.Clock(time.monotonic() - check.STARTED + 1.0)  # the whole budget ends in a second
    result = check._run_part(report, "slower", lambda: time.sleep(30) or {}, clock, 600.0)
    assert result["status"] == "failed" and result["seconds"] < 10
    assert list(json.loads((tmp_path / "gpu_check.json").read_text())["parts"]) == ["slow", "slower"]


def test_missing_parts_leave_a_view_of_the_cases_present(phantom_root: Path, tmp_path: Path) -> None:
    from crln.data.compact import CompactDataset, compact_h5_dataset

    compact_h5_dataset(phantom_root, tmp_path / "LA_compact", max_part_mib=0.5)
    parts = sorted((tmp_path / "LA_compact").glob("part*"))
    assert len(parts) >= 2
    carried = tmp_path / "carried"
    carried.mkdir()
    parts[0].rename(carried / parts[0].name)  # only the first part came in this call
    data = check._present_view(check.stage_data(carried, tmp_path / "work" / "data" / "LA"), tmp_path / "work")
    assert not data["complete"]
    present = data["lists"]["train"]["present"]
    assert 0 < len(present) < data["lists"]["train"]["listed"]
    view = CompactDataset(data["root"])
    assert view.ids("train") == present and view.ids("test") == data["lists"]["test"]["present"]
    assert view.load(present[0]).image.ndim == 3
