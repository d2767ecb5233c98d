"""Share of the training step spent waiting for data, from the trainer's own log, per number of workers.

Usage: python benchmarks/bench_data_wait.py [--configs la_cpu la_cpu_mean_teacher] [--workers 1 0 2]
       [--iterations 40] [--log-every 10] [--data DIR] [key=value ...]

Each configuration is trained for ``--iterations`` iterations (no validation, one final checkpoint)
into a temporary folder with ``crln.engine.trainer.train`` and its preset's settings (the in-memory
case cache, the data workers and pin-memory), once per value of ``data.num_workers`` in
``--workers`` (the first value should be the preset's). The trainer times ``next(loader)`` and logs,
every ``--log-every`` iterations, ``data_wait_fraction`` (data wait / wall time of the window) and
``seconds_per_iteration``. The first window includes the start of the worker processes and is shown
apart; the median is over the other windows. With 0 workers every batch is made in the training
process, so that row is the full cost of the data pipeline per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from crln.config import load_config
from crln.engine.run_folder import read_log
from crln.engine.trainer import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["la_cpu", "la_cpu_mean_teacher"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 0, 2])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--data", default=str(REPO / "data" / "LA_0.5"), help="data.root (the 0.5-scale LA copy)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.configs:
            for workers in args.workers:
                overrides = [
                    f"data.root={args.data}",
                    f"data.num_workers={workers}",
                    f"train.iterations={args.iterations}",
                    f"train.log_every={args.log_every}",
                    "train.val_every=0",
                    "data.validation=0",
                    f"train.checkpoint_every={args.iterations}",
                    f"train.output_dir={scratch}",
                    f"train.tag=workers{workers}",
                    "train.device=cpu",
                    *args.overrides,
                ]
                config = load_config(name, overrides)
                result = train(config, progress=False)
                windows = [r for r in read_log(result.run_dir / "log.jsonl") if "data_wait_fraction" in r]
                later = windows[1:] or windows
                rows.append(
                    (
                        name,
                        config.method.name,
                        workers,
                        config.data.pin_memory,
                        windows[0]["data_wait_fraction"],
                        statistics.median(r["data_wait_fraction"] for r in later),
                        max(r["data_wait_fraction"] for r in later),
                        statistics.median(r["seconds_per_iteration"] for r in later),
                    )
                )
                print(f"done: {name} with {workers} worker(s)", flush=True)
    print(f"{args.iterations} iterations, log every {args.log_every}; data wait as % of step time")
    print("| config | method | workers | pin memory | first window | median | max | s/it (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method, workers, pin, first, median, worst, seconds in rows:
        print(
            f"| {name} | {method} | {workers} | {pin} | {100 * first:.2f} | {100 * median:.2f} | "
            f"{100 * worst:.2f} | {seconds:.3f} |"
        )


if __name__ == "__main__":
    main()
