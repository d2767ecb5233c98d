"""Run a benchmark plan: several configs × seeds, sequentially and resumably, into one Markdown table.

A plan is a YAML file::

    title: LA at 0.5 scale, 8 labelled cases
    seeds: [1337]
    overrides: [train.output_dir=runs/bench]     # applied to every run
    evaluate: {split: test, checkpoint: final}
    runs:
      - name: Supervised
        config: la_cpu
      - name: Mean teacher (CutMix + noise)
        config: la_cpu_mean_teacher
        overrides: [method.unsup_weight=0.5]

Each (run, seed) trains unless its ``checkpoint_final.pt`` exists (an interrupted one resumes
from ``checkpoint_latest.pt``), then is evaluated unless its summary exists. The table is
rewritten after every run, so partial results are always on disk, and it lists the exact commands.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crln.atomic import atomic_write_text
from crln.config import check_known_keys, load_config, load_yaml
from crln.errors import CrlnError

if TYPE_CHECKING:
    from crln.engine.run_folder import RunFolder

__all__ = ["BenchPlan", "load_plan", "run_plan"]

METRICS = ("dice", "jaccard", "asd", "hd95")


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
    check_known_keys(raw, ["title", "runs", "seeds", "overrides", "evaluate"], source=source)
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
    seeds = raw.get("seeds", [1337])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise CrlnError(f"bench plan {path}: key seeds must be a non-empty list of integers, got {seeds!r}")
    evaluate = raw.get("evaluate") or {}
    if not isinstance(evaluate, dict):
        raise CrlnError(f"bench plan {path}: key evaluate must be a mapping (split, checkpoint, largest_component)")
    check_known_keys(evaluate, ["split", "checkpoint", "largest_component"], source=source, prefix="evaluate.")
    plan = BenchPlan(
        str(raw.get("title", path.stem)), runs, seeds, _strings(raw.get("overrides"), "overrides"), evaluate, path
    )
    for run in plan.runs:
        for seed in plan.seeds:
            load_config(run.config, _run_overrides(plan, run, seed))
    return plan


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


def _fmt(stats: dict[str, float] | None, scale: float) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "n/a"
    extra = f" ({stats['n_undefined']} undef.)" if stats.get("n_undefined") else ""
    return f"{stats['boot_mean'] * scale:.2f} ± {stats['boot_std'] * scale:.2f}{extra}"


def _write_figures(plan: BenchPlan, rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """PNGs beside the table (``<table stem>_<figure>.png``); returns ``[(caption, file name)]``."""
    from crln.engine.run_folder import read_log
    from crln.report.bench_figures import LoggedRun, plot_metric_by_method, plot_mu, plot_pseudo_label_quality

    logged = [
        LoggedRun(f"{row['name']} (seed {row['seed']})", read_log(Path(row["run_dir"]) / "log.jsonl"), row["S"])
        for row in rows
    ]
    figures = [
        ("Dice by method", "dice", lambda p: plot_metric_by_method(rows, p, "dice", plan.title)),
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


def _write_table(plan: BenchPlan, rows: list[dict[str, Any]], out: Path) -> None:
    import torch

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}"
    )
    if not torch.cuda.is_available():
        import os

        device += f", {os.cpu_count()} cores)"
    lines = [
        f"# {plan.title}",
        "",
        f"Plan: `{plan.path}`; written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}, {device}, "
        f"torch {torch.__version__}. Metrics: bootstrapped mean ± std over the evaluated cases (100 resamples); "
        "Dice and Jaccard in %, ASD and 95HD in the dataset's distance unit.",
        "",
        "| method | seed | Dice | Jaccard | ASD | 95HD | cases | iterations | s/it | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row.get("metrics", {})
        lines.append(
            f"| {row['name']} | {row['seed']} | {_fmt(m.get('dice'), 100)} | {_fmt(m.get('jaccard'), 100)} | "
            f"{_fmt(m.get('asd'), 1)} | {_fmt(m.get('hd95'), 1)} | {row.get('n_cases', '')} | {row.get('steps', '')} | "
            f"{row.get('seconds_per_iteration', float('nan')):.3f} | {row.get('train_minutes', float('nan')):.1f} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{row['command']}` → `{row['run_dir']}`" for row in rows]
    for caption, name in _write_figures(plan, rows, out):
        lines += ["", f"![{caption}]({name})"]
    atomic_write_text(out, "\n".join(lines) + "\n")


def run_plan(
    plan_path: str | Path, *, out: str | Path | None = None, dry_run: bool = False, progress: bool = True
) -> Path:
    """Train and evaluate every (run, seed) of a plan; returns the Markdown table's path."""
    plan = load_plan(plan_path)  # checked before torch loads
    from crln.engine.run_folder import RunFolder
    from crln.engine.trainer import train
    from crln.evaluation import evaluate

    out_path = Path(out) if out else Path(plan_path).with_suffix(".md")
    rows: list[dict[str, Any]] = []
    for run in plan.runs:
        for seed in plan.seeds:
            config = load_config(run.config, _run_overrides(plan, run, seed))
            folder = RunFolder.for_config(config)
            row: dict[str, Any] = {
                "name": run.name,
                "seed": seed,
                "command": _command(plan, run, seed),
                "run_dir": str(folder.path),
                # CRLN's S, drawn on the pseudo-label and μ figures
                "S": config.method.rectify_start if getattr(config.method, "dim", False) else None,
            }
            if dry_run:
                print(row["command"])
                continue
            if not folder.checkpoint("final").exists():
                resume = folder.checkpoint("latest").exists()
                print(f"[bench] {'resuming' if resume else 'training'} {run.name} (seed {seed})", flush=True)
                train(config, resume=resume, progress=progress)
            ev = plan.evaluate
            summary_path = _summary_path(folder, config, ev)
            if not summary_path.exists():
                print(f"[bench] evaluating {run.name} (seed {seed})", flush=True)
                evaluate(
                    folder.path,
                    split=ev.get("split"),
                    checkpoint=ev.get("checkpoint"),
                    largest_component=ev.get("largest_component"),
                    progress=progress,
                )
            summary = json.loads(summary_path.read_text())
            row.update(
                metrics=summary["metrics"],
                n_cases=summary["n_cases"],
                steps=summary["checkpoint_step"],
                **_training_stats(folder.path),
            )
            rows.append(row)
            _write_table(plan, rows, out_path)
    return out_path


def _summary_path(folder: RunFolder, config: Any, ev: dict[str, Any]) -> Path:
    from crln.evaluation import eval_dir_name

    split = ev.get("split") or config.data.test_split
    name = eval_dir_name(
        split, ev.get("checkpoint") or "final", bool(ev.get("largest_component")), default_split=config.data.test_split
    )
    return folder.path / name / "summary.json"
