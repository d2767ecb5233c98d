"""Training-step time of one job alone and of N identical jobs at once, with and without crln's OpenMP settings.

Usage: python benchmarks/bench_concurrency.py [--jobs 2] [--method supervised] [--patch 64 64 48]
       [--batch 2 2] [--steps 8] [--warmup 2] [--modes before passive after]

Each job is a separate process running the engine's training step (``train_step``, backward, SGD
step, ``after_optimizer_step``, as ``benchmarks/bench_step.py`` times it) on random tensors, with
torch's default thread count. Mode ``after`` starts the process as the ``crln`` command does
(:func:`crln.engine.cpu_threads.configure_openmp` before torch is imported: a short OpenMP spin);
mode ``before`` imports torch with the OpenMP defaults (long-spinning idle threads), as crln did
before issue #21; mode ``passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` (no spin), the alternative.
Mode ``spinN`` (e.g. ``spin1000``) sets ``GOMP_SPINCOUNT=N``, to compare other spin bounds with
crln's (:data:`crln.engine.cpu_threads.SPIN_COUNT`). Set no ``OMP_NUM_THREADS`` yourself when
measuring: it is passed on to the jobs.

For each mode: the job alone, then ``--jobs`` copies started together; it prints the median
seconds per step of every job and the slow-down of the concurrent jobs against the lone one, as a
Markdown table for benchmarks/RESULTS.md. The target of issue #21: two concurrent jobs each at most
2.5x slower than one alone (a fair share of 2 cores is 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from crln.engine.cpu_threads import SPIN_COUNT, WAIT_POLICY_ENVS  # torch-free

TARGET_RATIO = 2.5
MODES = {
    "before": "before (OpenMP defaults: long spin)",
    "passive": "OMP_WAIT_POLICY=passive (no spin)",
    "after": f"after (crln: GOMP_SPINCOUNT={SPIN_COUNT})",
}


def _worker(args: argparse.Namespace) -> None:
    """One job: print the seconds of each timed step as a JSON list (torch imported only here)."""
    if args.mode == "after":
        from crln.engine.cpu_threads import configure_openmp

        configure_openmp()
    elif args.mode == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    elif args.mode != "before":
        os.environ["GOMP_SPINCOUNT"] = str(_spin_count(args.mode))
    import torch
    from bench_step import _batch

    from crln.config import OptimConfig
    from crln.engine.allocator import tune_cpu_allocator
    from crln.engine.device import Performance
    from crln.engine.trainer import step_extra_optimizers
    from crln.methods import build_method, method_config_class
    from crln.models import VNet

    tune_cpu_allocator()
    perf = Performance.for_device(torch.device("cpu"))
    torch.manual_seed(0)
    batch = _batch(tuple(args.patch), *args.batch, torch.device("cpu"))
    batch.labeled_image, batch.unlabeled_image = perf.input(batch.labeled_image), perf.input(batch.unlabeled_image)
    method = perf.place(build_method(method_config_class(args.method)(name=args.method), lambda: VNet(), 2)).train()
    optimizers = method.configure_optimizers(OptimConfig(lr=1e-3, momentum=0.9, weight_decay=0.0))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = method.train_step(batch, step)
        optimizers.main.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizers.main.step()
        method.after_optimizer_step(step)
        step_extra_optimizers(optimizers, step)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "times": times}))


def _spin_count(mode: str) -> int:
    if not (mode.startswith("spin") and mode[4:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected before, passive, after or spinN (e.g. spin1000), got {mode!r}")
    return int(mode[4:])


def _mode(text: str) -> str:
    if text not in MODES:
        _spin_count(text)
    return text


def _label(mode: str) -> str:
    return MODES.get(mode) or f"GOMP_SPINCOUNT={_spin_count(mode)}"


def _run_jobs(args: argparse.Namespace, mode: str, jobs: int) -> list[dict]:
    """Start ``jobs`` workers at once and wait for all; returns their reports."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY_ENVS}
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--method", args.method]
    cmd += ["--patch", *map(str, args.patch), "--batch", *map(str, args.batch)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(jobs)]
    reports = []
    try:
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"a {mode} job failed with exit code {proc.returncode}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # an interrupted benchmark leaves no job running
            proc.kill()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="concurrent jobs (default 2)")
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", type=_mode, default=list(MODES), help="before, passive, after, spinN")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", type=_mode, default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    rows = []
    for mode in args.modes:
        alone = statistics.median(_run_jobs(args, mode, 1)[0]["times"])
        together = _run_jobs(args, mode, args.jobs)
        medians = [statistics.median(r["times"]) for r in together]
        rows.append((mode, together[0]["threads"], alone, medians))
        print(
            f"[{mode}] alone {alone:.3f} s/step; {args.jobs} at once: {', '.join(f'{m:.3f}' for m in medians)}",
            flush=True,
        )

    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, method {args.method}, "
        f"patch {tuple(args.patch)}, batch {args.batch[0]}+{args.batch[1]}, median of {args.steps} steps after "
        f"{args.warmup} warm-up; command: `python {' '.join(sys.argv)}`\n"
    )
    print("| mode | threads/job | alone s/step | concurrent s/step (each job) | worst ratio to alone | target ≤ 2.5× |")
    print("|---|---|---|---|---|---|")
    for mode, threads, alone, medians in rows:
        worst = max(medians) / alone
        print(
            f"| {_label(mode)} | {threads} | {alone:.3f} | {' / '.join(f'{m:.3f}' for m in medians)} | "
            f"{worst:.2f}× | {'yes' if worst <= TARGET_RATIO else 'no'} |"
        )


if __name__ == "__main__":
    main()
