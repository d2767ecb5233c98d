from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import tiny_overrides
from crln.bench import load_plan, run_plan
from crln.errors import CrlnError
from crln.report.bench_figures import smooth, smoothing_window


def _plan(tmp_path: Path, phantom_root: Path, body: str) -> Path:
    overrides = tiny_overrides(phantom_root, tmp_path / "runs", **{"train.iterations": 2})
    lines = "\n".join(f"  - '{o}'" for o in overrides)
    path = tmp_path / "plan.yaml"
    path.write_text(f"title: tiny\nseeds: [1, 2]\noverrides:\n{lines}\n{body}")
    return path


def test_plan_runs_resumably_into_one_table(tmp_path: Path, phantom_root: Path) -> None:
    plan = _plan(
        tmp_path,
        phantom_root,
        "runs:\n  - name: Sup\n    config: demo\n"
        "  - name: MT\n    config: demo\n    overrides: [method.name=mean_teacher]\n",
    )
    out = run_plan(plan, progress=False)
    table = out.read_text()
    assert table.count("| Sup |") == 2 and table.count("| MT |") == 2
    assert "crln train demo" in table and "train.seed=2" in table
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint_final.pt")}
    run_plan(plan, progress=False)  # everything done: nothing retrains
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint_final.pt")}
    assert before == after and len(before) == 4


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("runs: []\n", "non-empty list"),
        ("runs:\n  - name: x\n", "needs a config"),
        ("runs:\n  - config: demo\n    overrides: [optim.lrr=1]\n", "did you mean 'lr'"),
        ("runs:\n  - config: demo\nextra: 1\n", "unknown key extra"),
        (
            "runs:\n  - config: demo\n    overridez: [optim.lr=1]\n",
            r"runs\[0\].overridez: .*did you mean 'overrides'",
        ),
        ("runs:\n  - config: demo\nevaluate: {splitt: test}\n", "evaluate.splitt: .*did you mean 'split'"),
        ("runs:\n  - config: demo\nseedz: [1]\n", "did you mean 'seeds'"),
    ],
)
def test_bad_plans(tmp_path: Path, phantom_root: Path, body: str, fragment: str) -> None:
    with pytest.raises(CrlnError, match=fragment):
        load_plan(_plan(tmp_path, phantom_root, body))


@pytest.mark.parametrize(
    "plan",
    sorted(Path(__file__).resolve().parents[1].joinpath("benchmarks", "plans").glob("*.yaml")),
    ids=lambda p: p.stem,
)
def test_shipped_plans_resolve(plan: Path) -> None:
    # Every row of every shipped plan (the ablation ladders included) is a valid config.
    loaded = load_plan(plan)
    assert loaded.runs


def test_plan_figures(tmp_path: Path, phantom_root: Path) -> None:
    plan = _plan(
        tmp_path,
        phantom_root,
        "runs:\n  - name: Sup\n    config: demo\n"
        "  - name: CRLN\n    config: demo\n    overrides: [method.name=crln, method.rectify_start=0]\n",
    )
    plan.write_text(plan.read_text().replace("seeds: [1, 2]", "seeds: [1]"))
    table = run_plan(plan, progress=False).read_text()
    for suffix in ("dice", "pseudo_labels", "mu"):
        png = tmp_path / f"plan_{suffix}.png"
        assert f"]({png.name})" in table
        image = plt.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0.01


def test_smooth_is_a_trailing_mean() -> None:
    values = np.array([0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(smooth(values, window=2), [0.0, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(smooth(values, window=10), [0.0, 1.0, 2.0, 3.0])
    assert smooth(np.zeros(0)).size == 0


def test_smoothing_window_follows_the_run_length() -> None:
    assert smoothing_window(100) == 5  # 1000 iterations logged every 10: a 50-iteration window
    assert smoothing_window(4000) == 25  # capped
    assert smoothing_window(3) == 1
