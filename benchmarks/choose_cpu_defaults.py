"""Apply the rule that chooses the CPU presets' data path (docs/benchmarking.md, fixed before the rows landed).

Usage: python benchmarks/choose_cpu_defaults.py [--plan benchmarks/plans/la80_cpu_fidelity.yaml]
       [--seeds 1337 2024] [--margin 3]

Reads the fidelity plan's finished runs (trains nothing; a finished run whose validation summary is
missing is evaluated first, as ``crln bench --no-train`` would) and prints, in Markdown, every
candidate's final-checkpoint val Dice per seed, the scores and the verdict. It exits with 2, naming the
runs it still waits for, while any of them is missing; the test cases are never read for the choice.

The rule, as docs/benchmarking.md states it:

1. A data path's score is the mean of CRLN's and the mean teacher's val Dice on it, each the mean over
   the seeds. A path replaces today's (as stored) only if its score is higher by at least ``margin``
   points; among those, the highest wins.
2. Only if the authors' path wins: dropout 0.5 with separate forwards is kept if it raises CRLN's val
   Dice over the authors' path row by at least ``margin``; a test-time network (EMA teacher, rectified
   EMA teacher) is kept if it raises it over the student of the same run (the dropout row) by as much,
   and the higher of the two wins if both do.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

AS_STORED, ZSCORE, AUTHORS = "as stored", "z-score", "the authors' path"
PATHS = (AS_STORED, ZSCORE, AUTHORS)
METHODS = ("CRLN", "mean teacher")
# (data path, method) -> part of exactly one fidelity-plan row name (checked against the plan)
PATH_ROWS = {
    (AS_STORED, "CRLN"): "CRLN (issue-16 fixes",
    (AS_STORED, "mean teacher"): "Mean teacher (field",
    (ZSCORE, "CRLN"): "CRLN, z-score",
    (ZSCORE, "mean teacher"): "Mean teacher, z-score",
    (AUTHORS, "CRLN"): "+ the authors' data path",
    (AUTHORS, "mean teacher"): "Mean teacher (the authors'",
}
DROPOUT = "+ dropout 0.5"
NETWORK_ROWS = {"EMA teacher": "evaluated as the EMA teacher", "rectified EMA teacher": "rectified EMA teacher"}


@dataclass
class Decision:
    """The rule's outcome, or the rows it still waits for (``missing`` non-empty: no verdict)."""

    scores: dict[str, float] = field(default_factory=dict)  # data path -> score, in Dice points
    path: str | None = None
    dropout: bool | None = None  # None: not decided (the authors' path did not win, or rows missing)
    network: str | None = None  # "student" unless a teacher row wins; None: not decided
    missing: list[str] = field(default_factory=list)  # "row (seed S)"
    lines: list[str] = field(default_factory=list)  # the Markdown report


def mean_over_seeds(dice: dict[str, dict[int, float]], row: str, seeds: list[int], missing: list[str]) -> float | None:
    """Mean over ``seeds`` of ``dice[row]`` (val Dice in points per seed); None, with the absent seeds added to
    ``missing``, unless every seed is there."""
    absent = [seed for seed in seeds if seed not in dice.get(row, {})]
    missing += [f"{row} (seed {seed})" for seed in absent]
    return None if absent else sum(dice[row][seed] for seed in seeds) / len(seeds)


def choose_path(scores: dict[str, float], margin: float) -> str:
    """The path with the highest score among those at least ``margin`` above as stored; else as stored."""
    better = {path: s for path, s in scores.items() if path != AS_STORED and s >= scores[AS_STORED] + margin}
    return max(better, key=better.__getitem__) if better else AS_STORED


def decide(dice: dict[str, dict[int, float]], names: dict[str, str], seeds: list[int], margin: float) -> Decision:
    """The rule on ``dice`` (plan row name -> seed -> final val Dice in points); ``names`` maps the selectors of
    :data:`PATH_ROWS`, :data:`DROPOUT` and :data:`NETWORK_ROWS` to the plan's row names."""
    out = Decision()
    means = {key: mean_over_seeds(dice, names[sel], seeds, out.missing) for key, sel in PATH_ROWS.items()}
    if out.missing:
        return out
    out.lines += [
        "| data path | CRLN val Dice | mean teacher val Dice | score | vs as stored |",
        "|---|---|---|---|---|",
    ]
    for path in PATHS:
        out.scores[path] = (means[path, "CRLN"] + means[path, "mean teacher"]) / 2
        cells = [_per_seed(dice[names[PATH_ROWS[path, m]]], seeds) for m in METHODS]
        delta = out.scores[path] - out.scores.get(AS_STORED, out.scores[path])
        out.lines.append(f"| {path} | {cells[0]} | {cells[1]} | {out.scores[path]:.2f} | {delta:+.2f} |")
    out.path = choose_path(out.scores, margin)
    out.lines += ["", f"Data path: **{out.path}** (a path must score at least {margin:g} points above as stored)."]
    if out.path == AUTHORS:
        _step_two(out, dice, names, seeds, margin, means[AUTHORS, "CRLN"])
    return out


def _step_two(
    out: Decision,
    dice: dict[str, dict[int, float]],
    names: dict[str, str],
    seeds: list[int],
    margin: float,
    base: float,
) -> None:
    dropout = mean_over_seeds(dice, names[DROPOUT], seeds, out.missing)
    networks = {net: mean_over_seeds(dice, names[sel], seeds, out.missing) for net, sel in NETWORK_ROWS.items()}
    if out.missing:
        return
    assert dropout is not None
    out.dropout = dropout >= base + margin
    out.lines.append(
        f"Dropout 0.5 + separate forwards: CRLN val Dice {dropout:.2f} against {base:.2f} on the authors' path: "
        + ("kept." if out.dropout else "not kept.")
    )
    kept = {net: v for net, v in networks.items() if v is not None and v >= dropout + margin}
    out.network = max(kept, key=kept.__getitem__) if kept else "student"
    for net, value in networks.items():
        out.lines.append(f"Evaluated as the {net}: {value:.2f} against the student's {dropout:.2f}.")
    out.lines.append(f"Network evaluated: **{out.network}**.")


def _per_seed(values: dict[int, float], seeds: list[int]) -> str:
    shown = ", ".join(f"{values[s]:.2f}" for s in seeds)
    return f"{sum(values[s] for s in seeds) / len(seeds):.2f} ({shown})" if len(seeds) > 1 else shown


def waiting_line(missing: list[str], diverged: dict[str, str]) -> str:
    """The runs the rule waits for; one that diverged (``diverged``: "row (seed S)" -> "diverged at iteration N")
    says so, as it will not finish unless retried (``crln bench`` does not train a recorded divergence again)."""
    shown = [f"{m}: {diverged[m]}, see its diverged.json" if m in diverged else m for m in missing]
    return "No verdict yet; waiting for: " + "; ".join(shown)


def _plan_dice(plan_path: str, seeds: list[int]) -> tuple[dict[str, dict[int, float]], dict[str, str], dict[str, str]]:
    """Final val Dice (points) by row name and seed of the plan's finished runs; the selectors' row names; the
    diverged runs ("row (seed S)" -> "diverged at iteration N")."""
    from crln.bench import collect_rows, load_plan, seed_mean, select_rows

    plan = load_plan(plan_path)
    selectors = [*PATH_ROWS.values(), DROPOUT, *NETWORK_ROWS.values()]
    names = {sel: plan.runs[next(iter(select_rows(plan, [sel])))].name for sel in selectors}
    dice: dict[str, dict[int, float]] = {}
    diverged: dict[str, str] = {}
    for row in collect_rows(plan, progress=False, train_missing=False):
        for result in row.seeds:
            if result.seed in seeds and "final" in result.validation:
                dice.setdefault(row.name, {})[result.seed] = 100 * seed_mean(result.validation["final"], "dice")
        for d in row.diverged:
            diverged[f"{row.name} (seed {d.seed})"] = f"diverged at iteration {d.iteration}"
    return dice, names, diverged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="benchmarks/plans/la80_cpu_fidelity.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 2024])
    parser.add_argument("--margin", type=float, default=3.0, help="points a change must gain (default 3)")
    args = parser.parse_args(argv)
    dice, names, diverged = _plan_dice(args.plan, args.seeds)
    decision = decide(dice, names, args.seeds, args.margin)
    if decision.lines:
        print("\n".join(decision.lines))
    if decision.missing:
        print(waiting_line(decision.missing, diverged))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
