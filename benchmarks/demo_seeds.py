"""`crln demo`'s plan over several seeds: per-seed Dice, mean ± std, and the README's demo table.

    python benchmarks/demo_seeds.py                      # 3 seeds x supervised, mean teacher, CRLN
    python benchmarks/demo_seeds.py --jobs 2 --write     # seeds in 2 processes; update RESULTS.md and README.md

Each seed runs in its own demo folder (``<out>/seed<k>``), resumably: finished runs are kept, so an
interrupted measurement continues. ``--write`` replaces the text between the ``demo-seeds`` markers in
benchmarks/RESULTS.md and between the ``demo-table`` markers in README.md. The README gets the seed-1337
rows of `crln demo`'s methods, which is exactly the table `crln demo` prints (same plan, same seed; the
accuracy is a pure function of the seed, the timing columns are the measuring machine's).
tests/test_demo.py fails when the README's rows differ from RESULTS.md's or when the demo's preset,
plan or phantoms changed since the recorded measurement (the fingerprint below).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crln.demo import DEMO_METHODS, DEMO_SEEDS, demo_fingerprint, run_demo  # noqa: E402

RESULTS_MARKERS = ("<!-- demo-seeds:begin -->", "<!-- demo-seeds:end -->")
README_MARKERS = ("<!-- demo-table:begin -->", "<!-- demo-table:end -->")
README_SEED = 1337
HEADER = "| method | checkpoint | seed | Dice | Jaccard | ASD | 95HD | cases | iterations | s/it | train min |"
SEPARATOR = "|" + "---|" * (HEADER.count("|") - 1)


def _run_seed(out: Path, methods: list[str], seed: int) -> str:
    table = run_demo(out / f"seed{seed}", methods=methods, seeds=[seed], progress=False, fresh=False)
    return table.read_text()


def table_rows(table: str) -> list[str]:
    """The data rows of a bench table (``| method | final | seed | ...``), in order."""
    return [line for line in table.splitlines() if re.match(r"\| [^|]+ \| final \| \d+ \|", line)]


def _dice(row: str) -> float:
    return float(row.split("|")[4].split("±")[0])


def _summary(rows: list[str], methods: list[str], seeds: list[int]) -> list[str]:
    dice = {(r.split("|")[1].strip(), int(r.split("|")[3])): _dice(r) for r in rows}
    base = [dice[("supervised", s)] for s in seeds] if "supervised" in methods else None
    lines = [
        "| method | "
        + " | ".join(f"Dice seed {s}" for s in seeds)
        + " | mean ± std | gain over supervised (min … max) |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for m in methods:
        values = [dice[(m, s)] for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        gain = "" if base is None or m == "supervised" else _gain(values, base)
        lines.append(
            f"| {m} | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | {statistics.mean(values):.2f} ± {spread:.2f} | {gain} |"
        )
    return lines


def _gain(values: list[float], base: list[float]) -> str:
    gains = [v - b for v, b in zip(values, base, strict=True)]
    return f"{statistics.mean(gains):+.2f} ({min(gains):+.2f} … {max(gains):+.2f})"


def _replace_between(path: Path, markers: tuple[str, str], body: str) -> None:
    text = path.read_text()
    begin, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    path.write_text(text[:begin] + "\n" + body + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_seeds")
    parser.add_argument("--seeds", default=",".join(map(str, DEMO_SEEDS)))
    parser.add_argument("--methods", default="supervised,mean_teacher,crln")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once (one process each)")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md and README.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        tables = list(pool.map(_run_seed, [args.out] * len(seeds), [methods] * len(seeds), seeds))
    rows = [row for table in tables for row in table_rows(table)]
    command = f"python benchmarks/demo_seeds.py --seeds {args.seeds} --methods {args.methods} --jobs {args.jobs}"
    summary = _summary(rows, methods, seeds)
    results = [
        f"Command: `{command}`, started {started}, finished {time.strftime('%H:%M UTC', time.gmtime())}, on "
        f"{platform.node()} ({os.cpu_count()} cores, `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`).",
        f"Demo fingerprint `{demo_fingerprint()}` (`crln.demo.demo_fingerprint`: preset, plan and phantoms).",
        "",
        *summary,
        "",
        "Every run (bootstrapped mean ± std over the test cases; s/it and minutes are this machine's):",
        "",
        HEADER,
        SEPARATOR,
        *rows,
    ]
    print("\n".join(results))
    if args.write:
        shown = [r for r in rows if r.split("|")[1].strip() in DEMO_METHODS and int(r.split("|")[3]) == README_SEED]
        readme = ["```", HEADER, SEPARATOR, *shown, "```", ""]
        readme += [f"Dice (%) over seeds {', '.join(map(str, seeds))} (benchmarks/RESULTS.md):", "", *summary]
        _replace_between(ROOT / "benchmarks" / "RESULTS.md", RESULTS_MARKERS, "\n".join(results))
        _replace_between(ROOT / "README.md", README_MARKERS, "\n".join(readme))


if __name__ == "__main__":
    main()
