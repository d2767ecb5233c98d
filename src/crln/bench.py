"""Run a benchmark plan: several configs × seeds, sequentially and resumably, into one Markdown table.

A plan is a YAML file::

    title: LA at 0.5 scale, 8 labelled cases
    seeds: [1337, 2024, 7]
    overrides: [train.output_dir=runs/bench]     # applied to every run
    evaluate: {split: test}                      # checkpoint: final | best | [final, best] (default both);
                                                 # validation: false skips the held-out cases' val Dice
    reference: Mean teacher (CutMix + noise)     # optional: paired comparison of every row with this one
                                                 # (or a list of rows: one paired table and figure each)
    runs:
      - name: Supervised
        config: la_cpu
      - name: Mean teacher (CutMix + noise)
        config: la_cpu_mean_teacher
        overrides: [method.unsup_weight=0.5]

Each (run, seed) trains unless its ``checkpoint_final.pt`` exists (an interrupted one resumes
from ``checkpoint_latest.pt``), then its final checkpoint and the one chosen on the validation split
(``checkpoint_best.pt``, when validation ran) are evaluated unless their summaries exist, on the plan's
test list and on the run's held-out validation cases (the ``val Dice`` column). A table
row gathers a run's seeds: the mean ± std over seeds of the per-seed means beside the bootstrap
over cases × seeds pooled, and, with a ``reference``, the paired difference per case
(:mod:`crln.comparison`). The table is rewritten after every (run, seed), so partial results are
always on disk, and it lists the exact commands.

A (run, seed) whose training diverges (:class:`crln.errors.TrainingDiverged`) is recorded in its run folder
(``diverged.json``: the iteration the trainer reported) and tabled as such; the bench goes on with the other
rows and seeds, never trains a recorded divergence again (it would diverge again: on CPU a run repeats
exactly), and ends with the divergence's exit status.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crln.atomic import atomic_write_text, check_output_dir
from crln.config import EvalConfig, check_known_keys, load_config, load_yaml
from crln.errors import CrlnError, RunInterrupted, TrainingDiverged

if TYPE_CHECKING:
    from collections.abc import Callable

    from crln.comparison import PairedDifference
    from crln.engine.run_folder import RunFolder
    from crln.methods.base import TimelineMark
    from crln.metrics import Metric

__all__ = ["BenchPlan", "RowResult", "collect_rows", "load_plan", "run_plan", "seed_mean", "select_rows"]

PAIRED_METRICS = ("dice", "hd95")
CHECKPOINTS = ("final", "best")  # the last iteration's weights; the best on the validation split
CHECKPOINT_LABELS = {"final": "final", "best": "val-best"}
CHECKPOINT_DESCRIPTIONS = {
    "final": "final (the last iteration)",
    "best": "val-best (best Dice on the validation split, never the test cases)",
}
DIVERGED_RECORD = "diverged.json"  # in the run folder of a (run, seed) whose training diverged


@dataclass
class BenchRun:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class BenchPlan:
    title: str
    runs: list[BenchRun]
    seeds: list[int] = field(default_factory=lambda: [1337])
    overrides: list[str] = field(default_factory=list)
    evaluate: dict[str, Any] = field(default_factory=dict)
    path: Path = Path()
    # run names: every other row is compared with each, case by case
    references: list[str] = field(default_factory=list)


def _stats() -> Any:
    """:mod:`crln.comparison` (numpy, SciPy), loaded when a table is written, not when a plan is checked."""
    from crln import comparison

    return comparison


def _metrics() -> tuple[Metric, ...]:
    """The table's metric columns, :data:`crln.metrics.METRICS` (numpy, SciPy: loaded as :func:`_stats`)."""
    from crln import metrics

    return metrics.METRICS


def _scale(metric: str) -> float:
    from crln.metrics import metric_of

    found = metric_of(metric)
    return found[0].scale if found is not None else 1.0


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CrlnError(f"bench plan key {where}: expected a list of key=value strings, got {value!r}")
    return list(value)


def load_plan(path: str | Path) -> BenchPlan:
    """Read and check a plan file (every run's config is resolved once, so typos fail up front)."""
    path = Path(path)
    raw = load_yaml(path)
    source = f"bench plan {path}"
    check_known_keys(raw, ["title", "runs", "seeds", "overrides", "evaluate", "reference"], source=source)
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise CrlnError(f"bench plan {path}: key runs must be a non-empty list")
    runs = []
    for i, item in enumerate(runs_raw):
        if not isinstance(item, dict) or "config" not in item:
            raise CrlnError(f"bench plan {path}: runs[{i}] needs a config (preset name or YAML path)")
        check_known_keys(item, ["name", "config", "overrides"], source=source, prefix=f"runs[{i}].")
        runs.append(
            BenchRun(
                str(item.get("name", item["config"])),
                str(item["config"]),
                _strings(item.get("overrides"), f"runs[{i}].overrides"),
            )
        )
    _check_names(runs, path)
    seeds = _seeds(raw.get("seeds", [1337]), path)
    evaluate = _evaluate(raw.get("evaluate"), path)
    plan = BenchPlan(
        str(raw.get("title", path.stem)), runs, seeds, _strings(raw.get("overrides"), "overrides"), evaluate, path
    )
    plan.references = _references(raw.get("reference"), plan)
    _checkpoints(plan)
    for i, run in enumerate(plan.runs):
        for seed in plan.seeds:
            try:
                load_config(run.config, _run_overrides(plan, run, seed))
            except CrlnError as err:  # a plan may have many rows: say which one
                raise CrlnError(f"bench plan {path}: runs[{i}] ({run.name}): {err}") from None
    return plan


def _check_names(runs: list[BenchRun], path: Path) -> None:
    """Row names are distinct: the table, ``reference`` and ``--row`` name rows by them."""
    first: dict[str, int] = {}
    for i, run in enumerate(runs):
        j = first.setdefault(run.name, i)
        if j != i:
            raise CrlnError(
                f"bench plan {path}: runs[{i}].name: {run.name!r} is also the name of runs[{j}]; expected distinct "
                "names (a row without a name is named after its config)"
            )


def _seeds(value: Any, path: Path) -> list[int]:
    """``seeds``: distinct integers (a seed listed twice would count one run twice in the table)."""
    integers = isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    if not integers or not value:
        raise CrlnError(f"bench plan {path}: key seeds must be a non-empty list of integers, got {value!r}")
    repeated = sorted({s for s in value if value.count(s) > 1})
    if repeated:
        listed = ", ".join(map(str, repeated))
        raise CrlnError(f"bench plan {path}: key seeds lists {listed} more than once, expected distinct seeds")
    return value


def _evaluate(value: Any, path: Path) -> dict[str, Any]:
    """``evaluate``: a mapping of split (a case list's name), checkpoint, largest_component and validation."""
    evaluate = {} if value is None else value
    if not isinstance(evaluate, dict):
        raise CrlnError(
            f"bench plan {path}: key evaluate must be a mapping (split, checkpoint, largest_component, validation)"
        )
    keys = ["split", "checkpoint", "largest_component", "validation"]
    check_known_keys(evaluate, keys, source=f"bench plan {path}", prefix="evaluate.")
    for key in ("validation", "largest_component"):
        if key in evaluate and not isinstance(evaluate[key], bool):
            raise CrlnError(f"bench plan {path}: key evaluate.{key}: expected true or false, got {evaluate[key]!r}")
    split = evaluate.get("split")
    if split is not None and (not isinstance(split, str) or not split):
        raise CrlnError(f"bench plan {path}: key evaluate.split: expected the name of a case list, got {split!r}")
    return evaluate


def _references(value: Any, plan: BenchPlan) -> list[str]:
    """``reference``: one run name or a list of them (each gets its own paired table and figure)."""
    names = [run.name for run in plan.runs]
    chosen = _strings(value, "reference") if isinstance(value, list) else ([] if value is None else [str(value)])
    for name in chosen:
        if name not in names:
            raise CrlnError(f"bench plan {plan.path}: key reference: {name!r} is not the name of a run ({names})")
    return chosen


def _with_validation(plan: BenchPlan) -> bool:
    """Whether checkpoints are also scored on the runs' held-out validation cases (``evaluate.validation``)."""
    return plan.evaluate.get("validation", True)


def _checkpoints(plan: BenchPlan) -> list[str]:
    """The checkpoints to evaluate: ``evaluate.checkpoint`` (one name or a list), default final and best."""
    value = plan.evaluate.get("checkpoint", list(CHECKPOINTS))
    chosen = [value] if isinstance(value, str) else value
    if not isinstance(chosen, list) or not chosen or any(c not in CHECKPOINTS for c in chosen):
        raise CrlnError(
            f"bench plan {plan.path}: key evaluate.checkpoint: expected final, best or a list of them, got {value!r}"
        )
    if len(set(chosen)) != len(chosen):  # each would get its table line twice
        raise CrlnError(
            f"bench plan {plan.path}: key evaluate.checkpoint: expected final, best or a list of them, each once, "
            f"got {value!r}"
        )
    return chosen


def _run_overrides(plan: BenchPlan, run: BenchRun, seed: int) -> list[str]:
    return [*plan.overrides, *run.overrides, f"train.seed={seed}"]


def _command(plan: BenchPlan, run: BenchRun, seed: int) -> str:
    return shlex.join(["crln", "train", run.config, *_run_overrides(plan, run, seed)])


def _training_stats(run_dir: Path) -> dict[str, float]:
    from crln.engine.run_folder import read_log

    records = [r for r in read_log(run_dir / "log.jsonl") if "seconds_per_iteration" in r]
    if not records:
        return {}
    per_it = [r["seconds_per_iteration"] for r in records]
    steps = records[-1]["step"]
    return {"seconds_per_iteration": statistics.median(per_it), "train_minutes": sum(per_it) * steps / len(per_it) / 60}


@dataclass
class Evaluation:
    """One checkpoint's ``summary.json`` and its per-case metrics (``{case: {metric: value}}``)."""

    summary: dict[str, Any]
    per_case: dict[str, dict[str, float]]


@dataclass
class SeedResult:
    """One (run, seed): command, folder, training figures, data hash and evaluations by checkpoint."""

    seed: int
    command: str
    run_dir: Path
    training: dict[str, float] = field(default_factory=dict)
    split_sha256: str | None = None
    evals: dict[str, Evaluation] = field(default_factory=dict)
    validation: dict[str, Evaluation] = field(default_factory=dict)  # the same checkpoints on the held-out cases


@dataclass
class DivergedSeed:
    """A (run, seed) whose training diverged: the iteration the trainer reported, the record of it in the run
    folder, and whether this call was asked to train it (then the bench's exit status says it diverged)."""

    seed: int
    command: str
    record: Path
    iteration: int | None
    asked: bool


@dataclass
class RowResult:
    """A plan run (one table row per checkpoint) and the seeds done so far."""

    name: str
    marks: tuple[TimelineMark, ...]  # the method's timeline marks (CRLN's S), drawn on the log figures
    seeds: list[SeedResult] = field(default_factory=list)
    # the pooled bootstrap's resamples: the row's eval.bootstrap_resamples, as its runs' own summary.json
    resamples: int = EvalConfig.bootstrap_resamples
    diverged: list[DivergedSeed] = field(default_factory=list)  # tabled apart: they have no results

    def evaluated(self, checkpoint: str) -> list[tuple[SeedResult, Evaluation]]:
        return [(s, s.evals[checkpoint]) for s in self.seeds if checkpoint in s.evals]

    def per_case(self, checkpoint: str) -> dict[int, dict[str, dict[str, float]]]:
        return {s.seed: e.per_case for s, e in self.evaluated(checkpoint)}


def _fmt(stats: dict[str, float] | None, scale: float) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "n/a"
    extra = f" ({stats['n_undefined']} undef.)" if stats.get("n_undefined") else ""
    return f"{stats['boot_mean'] * scale:.2f} ± {stats['boot_std'] * scale:.2f}{extra}"


def seed_mean(evaluation: Evaluation, metric: str) -> float:
    """One seed's mean of ``metric`` over its cases with a defined value (``summarize``'s ``mean``)."""
    return _stats().seed_spread([row.get(metric, math.nan) for row in evaluation.per_case.values()])[0]


def _metric_cell(row: RowResult, checkpoint: str, pooled: dict[str, Any], metric: str) -> str:
    """``mean ± std over seeds (pooled bootstrap)``; a one-seed row has no spread: the bootstrap alone. A row
    of several seeds of which one has the metric defined (the others predicted nothing) says so."""
    scale = _scale(metric)
    means = [seed_mean(e, metric) for _, e in row.evaluated(checkpoint)]
    mean, std = _stats().seed_spread(means)
    defined = sum(not math.isnan(m) for m in means)
    if len(means) > 1 and defined == 1:
        return f"{mean * scale:.2f} (1 of {len(means)} seeds defined) ({_fmt(pooled.get(metric), scale)})"
    if math.isnan(std):
        return _fmt(pooled.get(metric), scale)
    return f"{mean * scale:.2f} ± {std * scale:.2f} ({_fmt(pooled.get(metric), scale)})"


def _validation_cell(done: list[tuple[SeedResult, Evaluation]], checkpoint: str) -> str:
    """Mean Dice on the run's held-out validation cases: mean ± std over seeds (one seed: its mean), in %."""
    means = [seed_mean(s.validation[checkpoint], "dice") for s, _ in done if checkpoint in s.validation]
    if not means:
        return "—"
    mean, std = _stats().seed_spread(means)
    scale = _scale("dice")
    return f"{mean * scale:.2f}" + ("" if math.isnan(std) else f" ± {std * scale:.2f}")


def _joined(values: list[Any]) -> str:
    """One value when every seed agrees, else the per-seed values in seed order."""
    return str(values[0]) if len(set(values)) == 1 else ", ".join(str(v) for v in values)


def _row_line(row: RowResult, checkpoint: str, with_validation: bool) -> str:
    label = CHECKPOINT_LABELS[checkpoint]
    done = row.evaluated(checkpoint)
    seeds = ", ".join(str(s.seed) for s, _ in done) or ", ".join(str(s.seed) for s in row.seeds)
    if not done:
        why = "none (no checkpoint_best.pt: data.validation = 0?)" if checkpoint == "best" else "not evaluated"
        return f"| {row.name} | {label}: {why} | {seeds} |" + " — |" * (len(_metrics()) + 4 + with_validation)
    pooled = _stats().pooled_summary(row.per_case(checkpoint), n_resamples=row.resamples)
    per_it = [s.training["seconds_per_iteration"] for s, _ in done if "seconds_per_iteration" in s.training]
    minutes = [s.training["train_minutes"] for s, _ in done if "train_minutes" in s.training]
    validation = f"{_validation_cell(done, checkpoint)} | " if with_validation else ""
    return (
        f"| {row.name} | {label} | {seeds} | {validation}"
        + " | ".join(_metric_cell(row, checkpoint, pooled, m.name) for m in _metrics())
        + f" | {_joined([e.summary['n_cases'] for _, e in done])} | "
        f"{_joined([e.summary['checkpoint_step'] for _, e in done])} | "
        f"{statistics.median(per_it) if per_it else math.nan:.3f} | "
        f"{statistics.mean(minutes) if minutes else math.nan:.1f} |"
    )


Paired = list[tuple["RowResult", str, dict[str, "PairedDifference | None"]]]


def _paired(plan: BenchPlan, rows: list[RowResult], name: str) -> tuple[RowResult | None, Paired]:
    """The reference row ``name`` (None if not run yet) and each other row's paired differences against it."""
    reference = next((r for r in rows if r.name == name), None)
    if reference is None:
        return None, []
    return reference, [
        (row, ck, {m: _stats().paired_difference(row.per_case(ck), reference.per_case(ck), m) for m in PAIRED_METRICS})
        for row in rows
        if row is not reference
        for ck in _checkpoints(plan)
        if row.evaluated(ck) and reference.evaluated(ck)
    ]


def _paired_items(plan: BenchPlan, rows: list[RowResult], name: str) -> list[tuple[str, dict[str, Any]]]:
    """``(row · checkpoint, paired differences)`` against reference ``name``, for the paired figure."""
    return [(f"{row.name} · {CHECKPOINT_LABELS[ck]}", diffs) for row, ck, diffs in _paired(plan, rows, name)[1]]


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _paired_lines(plan: BenchPlan, rows: list[RowResult], name: str) -> list[str]:
    reference, paired = _paired(plan, rows, name)
    lines = ["", f"## Paired differences against {name}", ""]
    if reference is None:
        return [*lines, "The reference row has not been evaluated yet."]
    lines += [
        "Per test case, the row's metric minus the reference's, each first averaged over the seeds both rows have; "
        "mean difference [percentile-bootstrap 95 % interval of the mean, 10,000 resamples], and the two-sided "
        "Wilcoxon signed-rank p-value over the cases (SciPy). Positive ΔDice and negative Δ95HD favour the row. "
        "Checkpoints are compared like with like (final with final, val-best with val-best).",
        "",
        "| method | checkpoint | seeds | cases | ΔDice % [95 % CI] | p (Dice) | Δ95HD [95 % CI] | p (95HD) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, ck, diffs in paired:
        cells, shared = [], None
        for metric in PAIRED_METRICS:
            d, scale = diffs[metric], _scale(metric)
            if d is None:
                cells += ["—", "—"]
                continue
            shared = shared or d
            undefined = f" ({d.n_undefined} undef.)" if d.n_undefined else ""
            cells += [
                f"{d.mean * scale:+.2f} [{d.ci_low * scale:+.2f}, {d.ci_high * scale:+.2f}]{undefined}",
                _p_value(d.p_value),
            ]
        seeds = ", ".join(map(str, shared.seeds)) if shared else "none shared"
        cases = len(shared.differences) if shared else 0
        lines.append(f"| {row.name} | {CHECKPOINT_LABELS[ck]} | {seeds} | {cases} | " + " | ".join(cells) + " |")
    return lines


def _data_lines(rows: list[RowResult]) -> list[str]:
    """The evaluated case list's hash (the same for every evaluation, or a warning that it is not)."""
    from crln.engine.run_folder import case_lists_sha256

    hashes = {
        case_lists_sha256({"cases": list(e.per_case)}): len(e.per_case)
        for row in rows
        for s in row.seeds
        for e in s.evals.values()
    }
    if not hashes:
        return ["No run of this plan has finished yet."]
    if len(hashes) == 1:
        ((digest, n),) = hashes.items()
        return [f"Every evaluation scored the same {n} cases (case-list sha256 `{digest[:16]}`)."]
    return [f"**Warning: the evaluations scored {len(hashes)} different case lists** (sha256 {sorted(hashes)})."]


def _write_figures(plan: BenchPlan, rows: list[RowResult], out: Path) -> list[tuple[str, str]]:
    """PNGs beside the table (``<table stem>_<figure>.png``); returns ``[(caption, file name)]``."""
    from crln.engine.run_folder import read_log
    from crln.report.bench_figures import (
        LoggedRun,
        MethodScores,
        plot_metric_by_method,
        plot_mu,
        plot_paired_differences,
        plot_pseudo_label_quality,
    )

    logged = [
        LoggedRun(f"{row.name} (seed {s.seed})", read_log(s.run_dir / "log.jsonl"), row.marks)
        for row in rows
        for s in row.seeds
    ]
    scores = [
        MethodScores(
            f"{row.name} · {CHECKPOINT_LABELS[ck]}",
            tuple(seed_mean(e, "dice") for _, e in row.evaluated(ck)),
            _stats().pooled_summary(row.per_case(ck), n_resamples=row.resamples).get("dice", {}),
        )
        for row in rows
        for ck in _checkpoints(plan)
        if row.evaluated(ck)
    ]
    figures = [
        (
            "Dice by method (points: each seed's mean)",
            "dice",
            lambda p: plot_metric_by_method(scores, p, "dice", plan.title),
        ),
        *(
            (
                f"Paired differences against {name}",
                "paired" if i == 0 else f"paired_{i + 1}",  # the first reference keeps the one-reference file name
                lambda p, name=name: plot_paired_differences(
                    _paired_items(plan, rows, name), p, f"Paired against {name}"
                ),
            )
            for i, name in enumerate(plan.references)
        ),
        (
            "Pseudo-label quality before / after rectification (paper Fig. 1)",
            "pseudo_labels",
            lambda p: plot_pseudo_label_quality(logged, p),
        ),
        ("μ over iterations (paper Fig. 11)", "mu", lambda p: plot_mu(logged, p)),
    ]
    written = []
    for caption, suffix, draw in figures:
        name = f"{out.stem}_{suffix}.png"
        if draw(out.with_name(name)) is not None:
            written.append((caption, name))
    return written


def _device() -> str:
    import torch  # late: plans are checked before torch loads

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _units_sentence() -> str:
    """``Dice and Jaccard in %, ASD and 95HD in the dataset's distance unit.``"""
    from crln.metrics import PERCENT

    def listed(labels: list[str]) -> str:
        return " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)

    percent = [m.label for m in _metrics() if m.unit == PERCENT]
    distance = [m.label for m in _metrics() if m.unit != PERCENT]
    parts = [f"{listed(percent)} in %"] if percent else []
    parts += [f"{listed(distance)} in the dataset's distance unit"] if distance else []
    return ", ".join(parts) + "."


def _checkpoints_sentence(checkpoints: list[str]) -> str:
    """What the table's checkpoint lines are: only those the plan evaluates (``evaluate.checkpoint``)."""
    described = " and ".join(CHECKPOINT_DESCRIPTIONS[c] for c in checkpoints)
    plural = "s" if len(checkpoints) > 1 else ""
    return f"Checkpoint{plural}: {described}; iterations: the checkpoint's, per seed when they differ."


def _validation_sentence(checkpoints: list[str]) -> str:
    """The val Dice column, and the val-best line's bias when the table has one."""
    sentence = (
        " val Dice: the same checkpoint's mean Dice (%) on the run's validation cases (held out of its training "
        "list), mean ± std over seeds: the column settings may be chosen on; the test columns may not."
    )
    if "best" in checkpoints:
        sentence += " The val-best line's val Dice is the best of several validations, so it is biased upwards"
        sentence += "; compare settings on the final line's." if "final" in checkpoints else "."
    return sentence


def _resamples_text(rows: list[RowResult]) -> str:
    """The pooled bootstrap's resamples: one number, or each row's when rows set eval.bootstrap_resamples apart."""
    counts = sorted({row.resamples for row in rows}) or [EvalConfig.bootstrap_resamples]
    if len(counts) == 1:
        return f"{counts[0]} resamples"
    return f"each row's eval.bootstrap_resamples resamples: {', '.join(map(str, counts))}"


def _diverged_at(iteration: int | None) -> str:
    return "diverged" if iteration is None else f"diverged at iteration {iteration}"


def _diverged_lines(row: RowResult, with_validation: bool) -> list[str]:
    """One line per diverged seed: it has no results, so it is shown apart from the row's seed statistics."""
    dashes = " — |" * (len(_metrics()) + 4 + with_validation)
    return [f"| {row.name} | {_diverged_at(d.iteration)} | {d.seed} |{dashes}" for d in row.diverged]


def _command_lines(rows: list[RowResult]) -> list[str]:
    """Each (run, seed)'s command and run folder; a diverged one says how to train it again."""
    lines = []
    for row in rows:
        for s in row.seeds:
            digest = f" (split `{s.split_sha256[:16]}`)" if s.split_sha256 else ""
            lines.append(f"- `{s.command}` → `{s.run_dir}`{digest}")
        for d in row.diverged:
            lines.append(
                f"- `{d.command}` → `{d.record.parent}`: **{_diverged_at(d.iteration)}**; the bench does not train "
                f"it again until `{d.record.name}` is deleted there"
            )
    return lines


def _write_table(plan: BenchPlan, rows: list[RowResult], out: Path) -> None:
    import torch

    validation = _with_validation(plan)
    checkpoints = _checkpoints(plan)
    lines = [
        f"# {plan.title}",
        "",
        f"Plan: `{plan.path}`; written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}, {_device()}, "
        f"torch {torch.__version__}. Each metric cell: mean ± std (ddof 1) over seeds of the per-seed case means "
        f"then in brackets the bootstrapped mean ± std over the cases of all seeds pooled (a one-seed row: the "
        f"bootstrap alone) "
        f"({_resamples_text(rows)}). {_units_sentence()} "
        + _checkpoints_sentence(checkpoints)
        + (_validation_sentence(checkpoints) if validation else ""),
        "",
        "| method | checkpoint | seeds | "
        + ("val Dice | " if validation else "")
        + " | ".join(m.label for m in _metrics())
        + " | cases | iterations | s/it | train min |",
        "|---|---|---|" + "---|" * (len(_metrics()) + validation) + "---|---|---|---|",
    ]
    for row in rows:  # a row whose every seed diverged has no checkpoint lines
        lines += [_row_line(row, ck, validation) for ck in checkpoints if row.seeds]
        lines += _diverged_lines(row, validation)
    for name in plan.references:
        lines += _paired_lines(plan, rows, name)
    lines += ["", *_data_lines(rows), "", "Commands (training split: sha256 of the labelled, unlabelled and validation "
              "case lists in the run's meta.json):", "", *_command_lines(rows)]  # fmt: skip
    for caption, name in _write_figures(plan, rows, out):
        lines += ["", f"![{caption}]({name})"]
    atomic_write_text(out, "\n".join(lines) + "\n")


def _evaluation(
    plan: BenchPlan, config: Any, folder: RunFolder, checkpoint: str, label: str, progress: bool, split: str | None
) -> Evaluation | None:
    """The evaluation of one checkpoint on case list ``split`` (run now unless its summary exists); None
    without that checkpoint."""
    from crln.evaluation import evaluate
    from crln.results import read_per_case

    if not folder.checkpoint(checkpoint).exists():
        return None
    lcc = _largest_component(plan, config)
    summary_path = _summary_path(folder, config, lcc, checkpoint, split)
    if not summary_path.exists():
        print(f"[bench] evaluating {label}, {checkpoint} checkpoint on {split or 'the test list'}", flush=True)
        evaluate(
            folder.path,
            split=split,
            checkpoint=checkpoint,
            largest_component=lcc,
            progress=progress,
            network=config.eval.network,
            out_dir=summary_path.parent,  # where the table reads it, whatever the run folder's own config says
        )
    per_case = {
        str(r["case"]): {k: v for k, v in r.items() if k not in ("case", "seconds")}
        for r in read_per_case(summary_path.with_name("per_case.csv"))
    }
    return Evaluation(json.loads(summary_path.read_text()), per_case)


def _split_sha256(folder: RunFolder) -> str | None:
    try:
        return json.loads((folder.path / "meta.json").read_text()).get("split_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def run_plan(
    plan_path: str | Path,
    *,
    out: str | Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    only_seeds: list[int] | None = None,
    only_rows: list[str] | None = None,
    train_missing: bool = True,
) -> Path:
    """Train and evaluate every (run, seed) of a plan; returns the Markdown table's path.

    With ``only_seeds`` or ``only_rows`` (see :func:`select_rows`), the other seeds or rows are not trained,
    but those already finished stay in the table; with ``train_missing=False`` nothing is trained: the
    finished runs are evaluated (what they lack) and tabled. The table is rewritten after every seed.

    Raises:
        TrainingDiverged: after every other (run, seed) asked for is done and tabled, when one of them diverged,
            in this call or an earlier one (its ``diverged.json``): the plan is not complete.
    """
    plan = load_plan(plan_path)  # checked before torch loads
    out_path = _table_path(Path(out) if out else Path(plan_path).with_suffix(".md"))
    rows = collect_rows(
        plan,
        dry_run=dry_run,
        progress=progress,
        only_seeds=only_seeds,
        only_rows=only_rows,
        train_missing=train_missing,
        on_update=lambda rows: _write_table(plan, rows, out_path),
    )
    if not rows and not dry_run:  # e.g. --no-train before any run finished: a table that says so
        _write_table(plan, rows, out_path)
    _raise_if_diverged(plan, rows, out_path)
    return out_path


def _raise_if_diverged(plan: BenchPlan, rows: list[RowResult], out: Path) -> None:
    """The divergences among the (run, seed)s this call was asked to train, as one line (exit 3 from the CLI)."""
    diverged = [
        f"{row.name} (seed {d.seed}) {_diverged_at(d.iteration)} ({d.record})"
        for row in rows
        for d in row.diverged
        if d.asked
    ]
    if diverged:
        raise TrainingDiverged(
            f"bench plan {plan.path}: {'; '.join(diverged)}; the other rows and seeds asked for are done, and {out} "
            f"tables them all; delete a run's {DIVERGED_RECORD} to train it again, or give the row its own train.tag"
        )


def _table_path(path: Path) -> Path:
    """``path`` as the table's file, checked before any training: not a folder, no file above it."""
    if path.is_dir():
        raise CrlnError(f"--out {path}: an existing folder, expected the table's file (e.g. {path / 'table.md'})")
    check_output_dir(path.parent, f"--out {path}: its folder")
    return path


def collect_rows(
    plan: BenchPlan,
    *,
    dry_run: bool = False,
    progress: bool = True,
    only_seeds: list[int] | None = None,
    only_rows: list[str] | None = None,
    train_missing: bool = True,
    on_update: Callable[[list[RowResult]], None] | None = None,
) -> list[RowResult]:
    """The plan's rows with their finished and diverged seeds (trained and evaluated as :func:`run_plan` says),
    in plan order; rows with neither are left out. ``on_update`` sees the rows after every seed."""
    unknown = sorted(set(only_seeds or []) - set(plan.seeds))
    if unknown:
        raise CrlnError(f"bench plan {plan.path}: seed(s) {unknown} are not in its seeds {plan.seeds}")
    rows_to_train = select_rows(plan, only_rows) if only_rows else set(range(len(plan.runs)))
    from crln.engine.run_folder import RunFolder
    from crln.methods import method_class

    rows: list[RowResult] = []
    for index, run in enumerate(plan.runs):
        row: RowResult | None = None
        for seed in plan.seeds:
            config = load_config(run.config, _run_overrides(plan, run, seed))
            folder = RunFolder.for_config(config)
            skipped = not train_missing or index not in rows_to_train or (only_seeds and seed not in only_seeds)
            finished = folder.checkpoint("final").exists()
            if skipped and not finished and not _diverged_record(folder).exists():
                continue
            if dry_run:
                print(_command(plan, run, seed))
                continue
            if row is None:
                marks = method_class(config.method.name).timeline_marks(config.method)
                row = RowResult(run.name, marks, resamples=config.eval.bootstrap_resamples)
                rows.append(row)
            label = f"{run.name} (seed {seed})"
            if finished:
                _check_finished_run(plan, folder, config, label)
            diverged = (
                None if finished else _train_unless_diverged(plan, run, seed, config, folder, progress, not skipped)
            )
            if diverged is not None:
                row.diverged.append(diverged)
            else:
                row.seeds.append(_evaluated(plan, config, folder, label, progress, _command(plan, run, seed)))
            if on_update is not None:
                on_update(rows)
    return rows


def _evaluated(plan: BenchPlan, config: Any, folder: RunFolder, label: str, progress: bool, command: str) -> SeedResult:
    """A finished (run, seed) with its evaluations (run now where their summaries are missing)."""
    result = SeedResult(config.train.seed, command, folder.path, _training_stats(folder.path))
    result.split_sha256 = _split_sha256(folder)
    for checkpoint in _checkpoints(plan):
        evaluation = _evaluation(plan, config, folder, checkpoint, label, progress, plan.evaluate.get("split"))
        if evaluation is not None:
            result.evals[checkpoint] = evaluation
        validation = _validation(plan, config, folder, checkpoint, label, progress)
        if validation is not None:
            result.validation[checkpoint] = validation
    return result


def _diverged_record(folder: RunFolder) -> Path:
    return folder.path / DIVERGED_RECORD


def _train_unless_diverged(
    plan: BenchPlan, run: BenchRun, seed: int, config: Any, folder: RunFolder, progress: bool, asked: bool
) -> DivergedSeed | None:
    """Train (or resume) an unfinished (run, seed); its divergence, recorded now or by an earlier call (then it is
    not trained again: on CPU it would diverge again at the same iteration), or None once it finished."""
    label = f"{run.name} (seed {seed})"
    _check_unfinished_run(plan, folder, config, label)
    record = _diverged_record(folder)
    if record.exists():
        diverged = _read_divergence(record, seed, _command(plan, run, seed), asked)
        if asked:
            print(
                f"[bench] {label} {_diverged_at(diverged.iteration)} (recorded in {record}): not training it again; "
                "delete that file to retry it from its last checkpoint, or give the row its own train.tag to train "
                "it anew",
                flush=True,
            )
        return diverged
    resume = folder.checkpoint("latest").exists()
    print(f"[bench] {'resuming' if resume else 'training'} {label}", flush=True)
    try:
        _train(config, resume, progress)
    except TrainingDiverged as err:
        _write_divergence(record, err)
        print(f"[bench] {label}: {err}; recorded in {record}, going on with the rest of the plan", flush=True)
        return _read_divergence(record, seed, _command(plan, run, seed), asked)
    return None


def _write_divergence(record: Path, err: TrainingDiverged) -> None:
    """``diverged.json`` in the run folder: the iteration and message the trainer reported, and when."""
    entry = {"iteration": err.iteration, "message": str(err), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(record, json.dumps(entry, indent=2) + "\n")


def _read_divergence(record: Path, seed: int, command: str, asked: bool) -> DivergedSeed:
    try:
        entry = json.loads(record.read_text())
        iteration = entry.get("iteration")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise CrlnError(
            f"{record}: not a divergence record of crln bench ({err}); delete it to train that run again"
        ) from None
    return DivergedSeed(seed, command, record, iteration if isinstance(iteration, int) else None, asked)


def _train(config: Any, resume: bool, progress: bool) -> None:
    """Train (or resume) one (run, seed); a stop by signal says how a bench continues: it has no ``--resume``."""
    from crln.engine.trainer import train

    try:
        train(config, resume=resume, progress=progress)
    except RunInterrupted as stop:
        how = "run the same command again: it resumes this run from that checkpoint"
        raise RunInterrupted(f"{stop.stopped}; {how}", stop.signal_name, stop.stopped) from None


def _saved_and_current(folder: RunFolder, config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run folder's ``config.yaml`` (empty without one) and the row's config, as nested dicts."""
    import yaml

    from crln.config import config_to_dict

    saved = yaml.safe_load(folder.config_path.read_text()) if folder.config_path.is_file() else None
    return saved or {}, config_to_dict(config)


def _training_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What the row changes of the run's training: evaluation settings may differ (a row may score another
    network of the same run); where and how fast it ran may too."""
    from crln.config import RUN_INVARIANT_KEYS, config_changes

    return config_changes(saved, current, RUN_INVARIANT_KEYS | {"eval.", "logging."})


def _listed(changed: list[str]) -> str:
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"{', '.join(changed[:3])}{more}"


def _check_finished_run(plan: BenchPlan, folder: RunFolder, config: Any, label: str) -> None:
    """Refuse a finished run folder that another config trained (a preset default changed since, or two rows
    share a ``train.tag``): its results would be tabled as this row's."""
    changed = _training_changes(*_saved_and_current(folder, config))
    if changed:
        raise CrlnError(
            f"bench plan {plan.path}: {label}: {folder.path} was trained with another config "
            f"({_listed(changed)}); give the row its own train.tag, or move that folder away to retrain it"
        )


def _check_unfinished_run(plan: BenchPlan, folder: RunFolder, config: Any, label: str) -> None:
    """Refuse an unfinished run (interrupted or diverged) that the row's config may not resume, in the bench's
    terms (the trainer's own refusal names ``--resume``, which the bench has not): the trainer's rule,
    :func:`crln.engine.state.resume_config_changes`, against the run folder's ``config.yaml``."""
    if not folder.checkpoint("latest").exists() and not _diverged_record(folder).exists():
        return  # nothing to resume: the trainer starts it afresh
    from crln.engine.state import resume_config_changes

    saved, current = _saved_and_current(folder, config)
    changed = resume_config_changes(saved, current)
    if not changed:
        return
    how = (
        "finish it first with the row that started it (--row), then this row evaluates it"
        if not _training_changes(saved, current)  # e.g. a row scoring the teacher of another row's run
        else "restore the row as it was to resume it, give the row its own train.tag, or move that folder away "
        "to train it anew"
    )
    raise CrlnError(
        f"bench plan {plan.path}: {label}: {folder.path} holds an unfinished run trained with another config "
        f"({_listed(changed)}); {how}"
    )


def select_rows(plan: BenchPlan, selectors: list[str]) -> set[int]:
    """The 0-based indices of the plan rows that ``selectors`` name: each a 1-based row number or a
    case-insensitive part of exactly one row's name (e.g. to train the rows a decision needs first)."""
    chosen = set()
    for selector in selectors:
        if selector.isdigit() and 1 <= int(selector) <= len(plan.runs):
            chosen.add(int(selector) - 1)
            continue
        matches = [i for i, run in enumerate(plan.runs) if selector.casefold() in run.name.casefold()]
        if len(matches) != 1:
            listed = "; ".join(f"{i + 1}: {run.name}" for i, run in enumerate(plan.runs))
            found = "no row" if not matches else f"{len(matches)} rows"
            raise CrlnError(
                f"bench plan {plan.path}: row {selector!r} names {found}; give a number or part of one name ({listed})"
            )
        chosen.add(matches[0])
    return chosen


def _validation(
    plan: BenchPlan, config: Any, folder: RunFolder, checkpoint: str, label: str, progress: bool
) -> Evaluation | None:
    """The checkpoint's evaluation on the run's held-out validation cases; None when it holds out none."""
    from crln.evaluation import VALIDATION_SPLIT

    if not _with_validation(plan) or (config.data.validation == 0 and not config.data.val_split):
        return None
    return _evaluation(plan, config, folder, checkpoint, label, progress, VALIDATION_SPLIT)


def _largest_component(plan: BenchPlan, config: Any) -> bool:
    """The plan's ``evaluate.largest_component``, else the row's ``eval.largest_component`` (as crln evaluate)."""
    value = plan.evaluate.get("largest_component")
    return config.eval.largest_component if value is None else bool(value)


def _summary_path(folder: RunFolder, config: Any, lcc: bool, checkpoint: str, split: str | None) -> Path:
    from crln.evaluation import eval_dir_name

    split = split or config.data.test_split
    name = eval_dir_name(
        split,
        checkpoint,
        lcc,
        default_split=config.data.test_split,
        default_checkpoint=config.eval.checkpoint,
        network=_other_network(folder, config),
    )
    return folder.path / name / "summary.json"


def _other_network(folder: RunFolder, config: Any) -> str | None:
    """The row's ``eval.network`` when the run folder's training (e.g. another row's, same ``train.tag``)
    saved another one: a row may evaluate the teacher of a run trained and evaluated as the student."""
    import yaml

    if not folder.config_path.is_file():  # a run folder of checkpoints and evaluations only
        return None
    saved = yaml.safe_load(folder.config_path.read_text()) or {}
    trained = (saved.get("eval") or {}).get("network", "student")
    return config.eval.network if config.eval.network != trained else None
