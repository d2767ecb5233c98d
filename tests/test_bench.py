from __future__ import annotations

import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from conftest import poison_supervised_step, tiny_overrides
from crln.bench import load_plan, run_plan
from crln.cli import main
from crln.engine.callbacks import Callback
from crln.engine.run_folder import RunFolder, case_lists_sha256
from crln.errors import CrlnError
from crln.report.bench_figures import LoggedRun, plot_pseudo_label_quality, smooth, smoothing_window
from crln.report.figures import legend_if_labelled


def _plan(tmp_path: Path, phantom_root: Path, body: str, seeds: str = "[1, 2]") -> Path:
    overrides = tiny_overrides(phantom_root, tmp_path / "runs", **{"train.iterations": 2})
    lines = "\n".join(f"  - '{o}'" for o in overrides)
    path = tmp_path / "plan.yaml"
    path.write_text(f"title: tiny\nseeds: {seeds}\noverrides:\n{lines}\n{body}")
    return path


def _supervised_and_mean_teacher(
    tmp_path: Path, phantom_root: Path, names: tuple[str, str] = ("Sup", "MT"), seeds: str = "[1, 2]"
) -> Path:
    """A plan of two rows: supervised training and the mean teacher, named ``names``."""
    body = (
        f"runs:\n  - name: {names[0]}\n    config: demo\n"
        f"  - name: {names[1]}\n    config: demo\n    overrides: [method.name=mean_teacher]\n"
    )
    return _plan(tmp_path, phantom_root, body, seeds)


def test_plan_runs_resumably_into_one_table(tmp_path: Path, phantom_root: Path) -> None:
    plan = _supervised_and_mean_teacher(tmp_path, phantom_root)
    plan.write_text(plan.read_text() + "reference: Sup\n")
    out = run_plan(plan, progress=False)
    table = out.read_text()
    # One line per row and checkpoint, each gathering both seeds; MT's also in the paired table against Sup.
    assert table.count("| Sup | final | 1, 2 |") == 1 and table.count("| MT | val-best | 1, 2 |") == 2
    assert "| MT | final | 1, 2 | 2 |" in table  # paired: the shared seeds, the 2 cases of the phantom test list
    assert "crln train demo" in table and "train.seed=2" in table
    # Each checkpoint also scored on the run's held-out validation case: the val Dice column.
    validation = json.loads(next((tmp_path / "runs").rglob("eval_validation_final/summary.json")).read_text())
    assert validation["split"] == "validation" and validation["n_cases"] == 1
    assert re.search(r"^\| Sup \| final \| 1, 2 \| \d+\.\d\d ± \d+\.\d\d \| ", table, re.M)
    assert (tmp_path / "plan_paired.png").is_file()
    meta = json.loads(next((tmp_path / "runs").rglob("meta.json")).read_text())
    assert meta["split_sha256"] == case_lists_sha256(meta["split"])
    assert f"(split `{meta['split_sha256'][:16]}`)" in table
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint_final.pt")}
    run_plan(plan, progress=False)  # everything done: nothing retrains
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint_final.pt")}
    assert before == after and len(before) == 4


def test_only_seeds_trains_those_and_keeps_finished_ones_in_the_table(tmp_path: Path, phantom_root: Path) -> None:
    plan = _plan(tmp_path, phantom_root, "runs:\n  - name: Sup\n    config: demo\n")
    assert "| Sup | final | 2 |" in run_plan(plan, progress=False, only_seeds=[2]).read_text()
    assert len(list((tmp_path / "runs").rglob("checkpoint_final.pt"))) == 1
    assert "| Sup | final | 2 |" in run_plan(plan, progress=False, only_seeds=[2]).read_text()
    assert "| Sup | final | 1, 2 |" in run_plan(plan, progress=False, only_seeds=[1]).read_text()
    with pytest.raises(CrlnError, match=r"seed\(s\) \[3\] are not in its seeds \[1, 2\]"):
        run_plan(plan, progress=False, only_seeds=[3])
    # Nothing trained: a run without checkpoint_final.pt is left out; a finished one gains what it lacks.
    for lacking in (tmp_path / "runs").rglob("eval_validation_final"):
        shutil.rmtree(lacking)
    plan.write_text(plan.read_text().replace("seeds: [1, 2]", "seeds: [1, 2, 3]"))
    table = run_plan(plan, progress=False, train_missing=False).read_text()
    assert "| Sup | final | 1, 2 |" in table and len(list((tmp_path / "runs").rglob("checkpoint_final.pt"))) == 2
    assert len(list((tmp_path / "runs").rglob("eval_validation_final"))) == 2


def test_only_rows_trains_the_rows_named_by_number_or_part_of_the_name(tmp_path: Path, phantom_root: Path) -> None:
    plan = _supervised_and_mean_teacher(tmp_path, phantom_root, ("Supervised", "Mean teacher"), seeds="[1]")
    listed = r"\(1: Supervised; 2: Mean teacher\)"
    for bad, why in (("3", "no row"), ("e", "2 rows"), ("crln", "no row")):
        with pytest.raises(CrlnError, match=rf"row '{bad}' names {why}; give a number .*{listed}"):
            run_plan(plan, progress=False, only_rows=[bad])
    table = run_plan(plan, progress=False, only_rows=["TEACHER"]).read_text()
    assert "| Mean teacher | final | 1 |" in table and "| Supervised |" not in table
    table = run_plan(plan, progress=False, only_rows=["1"]).read_text()
    assert "| Mean teacher | final | 1 |" in table and "| Supervised | final | 1 |" in table
    assert len(list((tmp_path / "runs").rglob("checkpoint_final.pt"))) == 2


def test_a_row_sharing_a_run_evaluates_its_own_network_without_training(tmp_path: Path, phantom_root: Path) -> None:
    mt = "config: demo\n    overrides: [method.name=mean_teacher, train.tag=shared"
    plan = _plan(
        tmp_path,
        phantom_root,
        f"runs:\n  - name: Student\n    {mt}]\n  - name: Teacher\n    {mt}, eval.network=teacher]\n",
        seeds="[1]",
    )
    table = run_plan(plan, progress=False).read_text()
    (run,) = (p.parent for p in (tmp_path / "runs").rglob("checkpoint_final.pt"))
    student = json.loads((run / "eval" / "summary.json").read_text())
    teacher = json.loads((run / "eval_test_final_teacher" / "summary.json").read_text())
    assert (student["network"], teacher["network"]) == ("student", "teacher")
    assert "| Student | final | 1 |" in table and "| Teacher | final | 1 |" in table
    # A row whose training differs (or a preset default changed since) does not take the finished run as its own.
    plan.write_text(plan.read_text() + f"  - name: Changed\n    {mt}, optim.lr=0.02]\n")
    with pytest.raises(
        CrlnError, match=r"Changed \(seed 1\): .* was trained with another config \(optim.lr: 0.01 -> 0.02\); give"
    ):
        run_plan(plan, progress=False)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("runs: []\n", "non-empty list"),
        ("runs:\n  - name: x\n", "needs a config"),
        ("runs:\n  - config: demo\n    overrides: [optim.lrr=1]\n", "did you mean 'lr'"),
        ("reference: Nope\nruns:\n  - config: demo\n", "'Nope' is not the name of a run"),
        ("reference: [Nope]\nruns:\n  - config: demo\n", "'Nope' is not the name of a run"),
        ("evaluate: {checkpoint: latest}\nruns:\n  - config: demo\n", "expected final, best or a list"),
        ("evaluate: {checkpoint: [final, final]}\nruns:\n  - config: demo\n", "expected final, best or a list"),
        ("runs:\n  - config: demo\nextra: 1\n", "unknown key extra"),
        (
            "runs:\n  - config: demo\n    overridez: [optim.lr=1]\n",
            r"runs\[0\].overridez: .*did you mean 'overrides'",
        ),
        ("runs:\n  - config: demo\nevaluate: {splitt: test}\n", "evaluate.splitt: .*did you mean 'split'"),
        ("runs:\n  - config: demo\nseedz: [1]\n", "did you mean 'seeds'"),
        ("evaluate: {validation: 1}\nruns:\n  - config: demo\n", "evaluate.validation: expected true or false"),
        (
            "evaluate: {largest_component: maybe}\nruns:\n  - config: demo\n",
            "evaluate.largest_component: expected true",
        ),
        ("evaluate: {split: 5}\nruns:\n  - config: demo\n", "evaluate.split: expected the name of a case list"),
        ("evaluate: []\nruns:\n  - config: demo\n", "key evaluate must be a mapping"),
        (
            "runs:\n  - name: A\n    config: demo\n  - name: A\n    config: demo\n",
            r"runs\[1\].name: 'A' is also the name of runs\[0\]; expected distinct names",
        ),
        # A row's config error names the row, among the many a plan may have.
        (
            "runs:\n  - config: demo\n  - name: B\n    config: demo\n    overrides: [optim.lrr=1]\n",
            r"runs\[1\] \(B\): unknown",
        ),
        ("runs:\n  - config: nopreset\n", r"plan.yaml: runs\[0\] \(nopreset\): config 'nopreset': no such"),
    ],
)
def test_bad_plans(tmp_path: Path, phantom_root: Path, body: str, fragment: str) -> None:
    with pytest.raises(CrlnError, match=fragment):
        load_plan(_plan(tmp_path, phantom_root, body))


@pytest.mark.parametrize(
    ("seeds", "fragment"),
    [("[1, 2, 1]", r"key seeds lists 1 more than once"), ("[true]", "non-empty list of integers"), ("'1'", "integers")],
)
def test_bad_seeds(tmp_path: Path, phantom_root: Path, seeds: str, fragment: str) -> None:
    with pytest.raises(CrlnError, match=fragment):
        load_plan(_plan(tmp_path, phantom_root, "runs:\n  - config: demo\n", seeds))


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
        seeds="[1]",
    )
    table = run_plan(plan, progress=False).read_text()
    # One seed: the validation case's Dice alone, then the bootstrap alone.
    assert re.search(r"\| Sup \| final \| 1 \| [\d.]+ \| [\d.]+ ± [\d.]+ \|", table)
    assert re.search(r"\| CRLN \| val-best \| 1 \| [\d.]+ \| [\d.]+ ± [\d.]+ \|", table)
    assert "Paired differences" not in table  # no reference in the plan
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


def test_pseudo_label_panels_without_data_draw_no_empty_legend(tmp_path: Path) -> None:
    # A run that logged reliability but no pseudo-label Dice (its unlabelled cases have no labels), and no
    # timeline mark: the Dice panels hold nothing labelled, and matplotlib warns of an empty legend.
    records = [{"step": s, "reliable_before": 0.5, "reliable_after": 0.6} for s in (10, 20, 30)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_pseudo_label_quality([LoggedRun("crln", records)], tmp_path / "pseudo_labels.png")
    assert fig is not None and fig.path.is_file()
    _, (empty, drawn) = plt.subplots(1, 2)
    drawn.plot([0, 1], [0, 1], label="before rectification")
    for ax in (empty, drawn):
        legend_if_labelled(ax)
    assert empty.get_legend() is None and drawn.get_legend() is not None  # a panel with data keeps its legend
    plt.close("all")


def test_case_lists_sha256_depends_on_the_cases_not_on_the_key_order() -> None:
    lists = {"labeled": ["a", "b"], "validation": ["c"]}
    assert case_lists_sha256(lists) == case_lists_sha256({"validation": ["c"], "labeled": ["a", "b"]})
    assert case_lists_sha256(lists) != case_lists_sha256({"labeled": ["b", "a"], "validation": ["c"]})
    assert len(case_lists_sha256(lists)) == 64


# Fake evaluations (no training): per seed and checkpoint, Dice and 95HD of three cases.
FAKE = {
    ("Ref", 1, "final"): [(0.70, 10.0), (0.80, 8.0), (0.60, 12.0)],
    ("Ref", 2, "final"): [(0.72, 9.0), (0.78, 8.0), (0.62, 11.0)],
    ("New", 1, "final"): [(0.75, 9.0), (0.83, 7.0), (0.66, 10.0)],
    ("New", 2, "final"): [(0.77, 8.0), (0.83, 7.0), (0.64, 10.0)],
    ("New", 1, "best"): [(0.74, 9.0), (0.84, 7.0), (0.62, float("nan"))],
    ("New", 2, "best"): [(0.76, 8.0), (0.82, 7.0), (0.66, 11.0)],
}
# The same checkpoints on the run's one held-out validation case: Dice.
FAKE_VALIDATION = {
    ("Ref", 1, "final"): 0.50,
    ("Ref", 2, "final"): 0.70,
    ("New", 1, "final"): 0.60,
    ("New", 2, "final"): 0.80,
    ("New", 1, "best"): 0.90,
    ("New", 2, "best"): 0.85,
}


def _fake_evaluation(folder: Path, rows: list[tuple[float, float]], step: int) -> None:
    folder.mkdir()
    csv_lines = ["case,dice,jaccard,asd,hd95,seconds"]
    csv_lines += [f"c{i},{d:.6f},{d / 2:.6f},1.0,{h:.6f},0.1" for i, (d, h) in enumerate(rows)]
    (folder / "per_case.csv").write_text("\n".join(csv_lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"n_cases": len(rows), "checkpoint_step": step}))


def _fake_run(folder: RunFolder, seed: int, name: str) -> None:
    """A finished run folder: checkpoints, a log, meta.json and the evaluations of FAKE and FAKE_VALIDATION."""
    folder.path.mkdir(parents=True)
    folder.write_meta({"split": {"labeled": ["t1"], "unlabeled": ["t2"], "validation": ["t3"]}})
    folder.log_path.write_text("".join(json.dumps({"step": s, "seconds_per_iteration": 0.5}) + "\n" for s in (5, 10)))
    for checkpoint, eval_dir in (("final", "eval"), ("best", "eval_test_best")):
        rows = FAKE.get((name, seed, checkpoint))
        if rows is None:
            continue
        folder.checkpoint(checkpoint).write_bytes(b"")
        step = 10 if checkpoint == "final" else 5 + seed
        _fake_evaluation(folder.path / eval_dir, rows, step)
        dice = FAKE_VALIDATION[(name, seed, checkpoint)]
        _fake_evaluation(folder.path / f"eval_validation_{checkpoint}", [(dice, 5.0)], step)


def test_table_from_fake_evaluations(tmp_path: Path, phantom_root: Path) -> None:
    plan = _plan(
        tmp_path,
        phantom_root,
        "reference: [Ref, New]\nruns:\n  - name: Ref\n    config: demo\n    overrides: [train.tag=ref]\n"
        "  - name: New\n    config: demo\n    overrides: [train.tag=new]\n",
    )
    for name in ("Ref", "New"):
        for seed in (1, 2):
            _fake_run(
                RunFolder(tmp_path / "runs" / "phantom" / f"supervised__vnet__{name.lower()}" / f"seed{seed}"),
                seed,
                name,
            )
    table = run_plan(plan, progress=False).read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]

    def line(prefix: str) -> str:
        (found,) = [candidate for candidate in lines if candidate.startswith(prefix)]
        return found

    # Ref, final: per-seed Dice means 70 and 70.667 -> 70.33 ± 0.47 (sample std); one iteration count.
    ref_final = line("| Ref | final | 1, 2 | 60.00")
    assert "| 70.33 ± 0.47 (" in ref_final and "| 3 | 10 | 0.500 |" in ref_final
    # val Dice: the validation case's Dice over seeds, 50 and 70 -> 60.00 ± 14.14; New's val-best 90, 85.
    assert ref_final.startswith("| Ref | final | 1, 2 | 60.00 ± 14.14 | 70.33 ± 0.47 (")
    assert line("| New | val-best |").startswith("| New | val-best | 1, 2 | 87.50 ± 3.54 | ")
    assert "val-best: none (no checkpoint_best.pt" in line("| Ref | val-best")
    # New, final 95HD: seed means 8.667 and 8.333 -> 8.50 ± 0.24.
    assert "| 8.50 ± 0.24 (" in line("| New | final | 1, 2 | 70.00 ± 14.14 | 74.67 ± 0.00 (")
    # New, val-best: seed 1's 95HD mean skips its undefined case (8.0), seed 2's is 8.667.
    best = line("| New | val-best |")
    assert "| 8.33 ± 0.47 (" in best and "(1 undef.)" in best and "| 3 | 6, 7 |" in best
    # Paired, final (per case, averaged over both seeds): ΔDice +5, +4, +4 points; Δ95HD -1, -1, -1.5.
    # Three cases of one sign: the exact two-sided Wilcoxon p is 2 / 2^3.
    paired = line("| New | final | 1, 2 | 3 |")
    assert "| +4.33 [+4.00, +5.00] | 0.250 | -1.17 [-1.50, -1.00] | 0.250 |" in paired
    # A second reference gets its own table (Ref against New: the same differences, signs flipped) and figure.
    assert table.index("## Paired differences against Ref") < table.index("## Paired differences against New")
    assert "| -4.33 [-5.00, -4.00] | 0.250 | +1.17 [+1.00, +1.50] | 0.250 |" in line("| Ref | final | 1, 2 | 3 |")
    assert "Every evaluation scored the same 3 cases" in table
    for suffix in ("dice", "paired", "paired_2"):
        assert f"]({plan.stem}_{suffix}.png)" in table and (tmp_path / f"{plan.stem}_{suffix}.png").is_file()


def test_a_row_whose_config_keeps_the_largest_component_is_tabled(tmp_path: Path, phantom_root: Path) -> None:
    # eval.largest_component=true (la_bcp, pancreas_bcp) makes crln evaluate write eval_test_final_lcc/, not eval/:
    # the bench reads what it asked for, and finds it again on the next call instead of evaluating once more.
    plan = _plan(
        tmp_path,
        phantom_root,
        "evaluate: {checkpoint: final, validation: false}\n"
        "runs:\n  - name: LCC\n    config: demo\n    overrides: [eval.largest_component=true]\n",
        seeds="[1]",
    )
    assert "| LCC | final | 1 | " in run_plan(plan, progress=False).read_text()
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    assert summary.parent.name == "eval_test_final_lcc" and json.loads(summary.read_text())["largest_component"]
    before = summary.stat().st_mtime_ns
    run_plan(plan, progress=False)
    assert summary.stat().st_mtime_ns == before


class _SignalAt(Callback):
    """Sends this process SIGINT as iteration ``step`` ends, as Ctrl-C in the terminal of ``crln bench`` would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run: object, step: int, out: object) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _plan_whose_training_gets_sigint(tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-row plan whose training receives SIGINT at its first iteration (``monkeypatch.undo()`` ends that)."""
    import crln.engine.trainer as trainer_module

    real_train = trainer_module.train
    monkeypatch.setattr(
        trainer_module, "train", lambda config, **kw: real_train(config, callbacks=[_SignalAt(0)], **kw)
    )
    plan = _plan(
        tmp_path, phantom_root, "evaluate: {validation: false}\nruns:\n  - name: Sup\n    config: demo\n", "[1]"
    )
    return plan


def test_an_interrupted_bench_says_how_to_continue_it(
    tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan_whose_training_gets_sigint(tmp_path, phantom_root, monkeypatch)
    assert main(["bench", str(plan), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    # crln bench has no --resume: the same bench command resumes the run.
    assert re.match(r"crln: stopped by SIGINT after iteration \d+; checkpoint saved in ", err) and "--resume" not in err
    assert err.endswith("run the same command again: it resumes this run from that checkpoint")
    monkeypatch.undo()  # the real training again
    assert "| Sup | final | 1 |" in run_plan(plan, progress=False).read_text()


def test_a_table_path_that_cannot_be_written_is_refused_before_any_training(tmp_path: Path, phantom_root: Path) -> None:
    plan = _plan(tmp_path, phantom_root, "runs:\n  - name: Sup\n    config: demo\n", "[1]")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CrlnError, match=r"--out .*folder: an existing folder, expected the table's file"):
        run_plan(plan, out=tmp_path / "folder", progress=False)
    with pytest.raises(CrlnError, match=r"--out .*plan.yaml/table.md: its folder .*plan.yaml: an existing file"):
        run_plan(plan, out=plan / "table.md", progress=False)
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plan.yaml"]


def test_a_metric_undefined_for_every_case_of_one_seed_is_not_shown_as_a_one_seed_cell(
    tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # New's seed 1 predicted nothing on every case: its 95HD is undefined, so the over-seeds std is too.
    monkeypatch.setitem(FAKE, ("New", 1, "final"), [(0.0, float("nan"))] * 3)
    plan = _plan(
        tmp_path,
        phantom_root,
        "evaluate: {checkpoint: final}\nruns:\n  - name: New\n    config: demo\n    overrides: [train.tag=new]\n",
    )
    for seed in (1, 2):
        _fake_run(RunFolder(tmp_path / "runs" / "phantom" / "supervised__vnet__new" / f"seed{seed}"), seed, "New")
    (line,) = [x for x in run_plan(plan, progress=False).read_text().splitlines() if x.startswith("| New | final")]
    # Seed 2's mean 95HD is 8.33; the cell says it stands for 1 of the row's 2 seeds, then the pooled bootstrap.
    assert "| 8.33 (1 of 2 seeds defined) (8.45 ± 0.73 (3 undef.)) |" in line


def test_no_train_before_any_run_finished_writes_a_table_saying_so(tmp_path: Path, phantom_root: Path) -> None:
    # crln bench PLAN --no-train prints "table written: PATH": that file must exist and not claim results.
    plan = _supervised_and_mean_teacher(tmp_path, phantom_root)
    plan.write_text(plan.read_text() + "reference: Sup\n")
    table = run_plan(plan, progress=False, train_missing=False).read_text()
    assert "No run of this plan has finished yet." in table and "Warning" not in table
    assert not [line for line in table.splitlines() if line.startswith("| Sup")]
    assert not (tmp_path / "runs").exists()


def _diverge_seed(monkeypatch: pytest.MonkeyPatch, seed: int, at_step: int) -> None:
    """Make the supervised baseline's loss infinite at ``at_step`` in the run of ``seed`` only."""

    def infinite(out: dict[str, torch.Tensor]) -> None:
        if torch.initial_seed() == seed:  # the trainer seeds torch with train.seed
            out["loss"] = out["loss"] * float("inf")

    poison_supervised_step(monkeypatch, at_step, infinite)


def test_a_diverged_seed_is_recorded_tabled_and_not_trained_again(
    tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import crln.engine.trainer as trainer_module
    from crln.errors import EXIT_DIVERGED

    plan = _supervised_and_mean_teacher(tmp_path, phantom_root)
    plan.write_text(plan.read_text() + "evaluate: {checkpoint: final, validation: false}\n")
    _diverge_seed(monkeypatch, seed=2, at_step=1)
    # Sup's seed 2 diverges; the bench records it and goes on with MT, then says so with exit 3.
    assert main(["bench", str(plan), "--no-progress"]) == EXIT_DIVERGED
    captured = capsys.readouterr()
    (marker,) = (tmp_path / "runs").rglob("diverged.json")
    assert marker.parent.name == "seed2" and marker.parent.parent.name.startswith("supervised")
    record = json.loads(marker.read_text())
    assert record["iteration"] == 2 and "loss term 'loss' is inf" in record["message"]
    (error,) = captured.err.strip().splitlines()
    assert error.startswith("crln: error: ") and "Sup (seed 2) diverged at iteration 2" in error
    assert str(marker) in error and "Traceback" not in captured.err
    table = plan.with_suffix(".md").read_text()
    # The diverged seed has a line of its own, and is not among the seeds of Sup's statistics.
    assert "| Sup | final | 1 |" in table and "| MT | final | 1, 2 |" in table
    assert "| Sup | diverged at iteration 2 | 2 |" in table
    # Run again: the recorded divergence is not trained again (it would diverge again), and says how to retry.
    monkeypatch.setattr(trainer_module, "train", lambda *a, **k: pytest.fail("a recorded divergence trained again"))
    assert main(["bench", str(plan), "--no-progress"]) == EXIT_DIVERGED
    out = capsys.readouterr().out
    assert f"Sup (seed 2) diverged at iteration 2 (recorded in {marker}): not training it again" in out
    assert "delete that file" in out and "train.tag" in out
    assert "| Sup | diverged at iteration 2 | 2 |" in plan.with_suffix(".md").read_text()
    # A call that trains nothing, or not that row, does not fail on it; the table still shows it.
    assert main(["bench", str(plan), "--no-progress", "--no-train"]) == 0
    assert main(["bench", str(plan), "--no-progress", "--row", "MT"]) == 0
    assert "| Sup | diverged at iteration 2 | 2 |" in plan.with_suffix(".md").read_text()


def test_an_unfinished_run_of_an_edited_row_is_refused_in_bench_terms(
    tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan_whose_training_gets_sigint(tmp_path, phantom_root, monkeypatch)
    assert main(["bench", str(plan), "--no-progress"]) == 130  # stopped: checkpoint_latest.pt, no final
    monkeypatch.undo()  # the real training again
    plan.write_text(plan.read_text().replace("config: demo\n", "config: demo\n    overrides: [optim.lr=0.02]\n"))
    with pytest.raises(CrlnError) as caught:
        run_plan(plan, progress=False)
    message = str(caught.value)
    assert re.search(
        r"Sup \(seed 1\): .*seed1 holds an unfinished run trained with another config "
        r"\(optim.lr: 0.01 -> 0.02\); ",
        message,
    )
    assert "--resume" not in message and "train.tag" in message


def _fake_new_runs(tmp_path: Path, seeds: tuple[int, ...] = (1, 2)) -> None:
    for seed in seeds:
        _fake_run(RunFolder(tmp_path / "runs" / "phantom" / "supervised__vnet__new" / f"seed{seed}"), seed, "New")


@pytest.mark.parametrize(
    ("checkpoint", "shown", "absent"), [("final", "final", "val-best"), ("best", "val-best", "final")]
)
def test_the_table_header_describes_only_the_checkpoints_it_shows(
    tmp_path: Path, phantom_root: Path, checkpoint: str, shown: str, absent: str
) -> None:
    plan = _plan(
        tmp_path,
        phantom_root,
        f"evaluate: {{checkpoint: {checkpoint}}}\n"
        "runs:\n  - name: New\n    config: demo\n    overrides: [train.tag=new]\n",
    )
    _fake_new_runs(tmp_path)
    header = next(line for line in run_plan(plan, progress=False).read_text().splitlines() if line.startswith("Plan:"))
    assert f"Checkpoint: {shown} (" in header and absent not in header


def test_a_one_seed_bracket_is_the_runs_own_bootstrap_with_its_resamples(tmp_path: Path, phantom_root: Path) -> None:
    from crln.metrics import summarize
    from crln.results import read_per_case

    plan = _plan(
        tmp_path,
        phantom_root,
        "evaluate: {checkpoint: final, validation: false}\nruns:\n  - name: New\n    config: demo\n"
        "    overrides: [train.tag=new, eval.bootstrap_resamples=7]\n",
        seeds="[1]",
    )
    _fake_new_runs(tmp_path, (1,))
    table = run_plan(plan, progress=False).read_text()
    # What crln evaluate writes in summary.json: the cases' bootstrap with the run's eval.bootstrap_resamples.
    (csv,) = (tmp_path / "runs").rglob("eval/per_case.csv")
    rows = [{k: v for k, v in r.items() if k not in ("case", "seconds")} for r in read_per_case(csv)]
    own, default = (summarize(rows, n_resamples=n, seed=0)["dice"] for n in (7, 100))
    cell = f"| {100 * own['boot_mean']:.2f} ± {100 * own['boot_std']:.2f} |"
    assert cell != f"| {100 * default['boot_mean']:.2f} ± {100 * default['boot_std']:.2f} |"
    assert cell in next(line for line in table.splitlines() if line.startswith("| New | final"))
    assert "(7 resamples)" in table
