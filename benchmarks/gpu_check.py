"""The GPU acceptance run (issue #20): one device call of about ten minutes answering what matters first.

Usage (on a lent device; ``docs/reproduce.md`` has the calls and what to carry)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT [--budget-s 540]
    python benchmarks/gpu_check.py --dry-run --out DIR      # every part on CPU, tiny sizes (make test)

Within the wall-clock budget (counted from interpreter start; parts that no longer fit are skipped,
and an alarm stops a part that overruns), in this order, rewriting ``gpu_check.json`` and
``gpu_check.md`` in ``--out`` after each part so that a killed call still returns what it measured:

1. ``environment``: GPU name and memory, driver, torch, CUDA and cuDNN versions;
2. ``cuda_tests``: ``pytest -m cuda tests/test_mixed_precision.py`` (AMP, channels-last, cuDNN, bf16
   evaluation parity with fp32, a one-process NCCL group), in a subprocess with a timeout;
3. ``step_times`` and ``step_times_compiled``: seconds per training step of supervised, mean teacher,
   UA-MT and CRLN at 112×112×80, batch 2+2, in fp32, bf16 autocast and bf16 + channels-last, then the
   latter + ``torch.compile`` (mean teacher and CRLN): median after warm-up, ratio to the mean
   teacher of the same variant, resident and peak memory (``bench_step.time_steps``);
4. ``data_path``: the real loader at full resolution on the carried training cases, each batch
   followed by a pause as long as the CRLN step just measured, for several numbers of workers and
   pinned memory: the data wait as a share of the step, against the 5 % target, and what meets it;
5. ``inference``: sliding-window s/volume on the carried test cases (strides 18×18×4) in fp32 and
   in bf16 + channels-last (what ``crln evaluate`` runs on CUDA), with the argmax agreement;
6. ``crln_run``: with the time left, ``la_crln`` at full resolution for as many iterations as fit
   (``train(time_budget_s=...)``; a rerun on a warm machine resumes it), its evaluation on the
   carried test cases, and its step time and data wait from its own log.

The data arrive as the compact LA copy in parts (``data/LA_compact/part*``, under 64 MiB per call);
parts carried by earlier calls of a warm machine add up in ``/tmp/crln/data``. The environment
part reports which cases are there; a part whose cases are missing is skipped with the reason, and
training uses the training cases present.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # device_io and bench_step beside this script
from device_io import REPO, STARTED, WORK, TransferError, import_crln, install_wheels, stage_data

BUDGET_S = 540.0  # of the device's 600 s per command: interpreter start, copying $OUT back, margin
GRACE_S = 15.0  # the alarm stops an overrunning part this long after the budget
DATA_WAIT_TARGET = 0.05
METHODS = ("supervised", "mean_teacher", "ua_mt", "crln")
MIB = 2**20


@dataclass
class Settings:
    """Sizes of one check: the full one on CUDA, or the dry run's tiny ones on CPU."""

    device: str = "cuda"
    patch: tuple[int, int, int] = (112, 112, 80)
    batch: tuple[int, int] = (2, 2)
    n_filters: int = 16
    steps: int = 5
    warmup: int = 3
    compile_backend: str = "inductor"
    compiled_methods: tuple[str, ...] = ("mean_teacher", "crln")
    loader_setups: tuple[tuple[int, bool], ...] = ((4, True), (0, True), (2, True), (8, True), (4, False))
    loader_batches: int = 10
    max_simulated_step_s: float = 5.0
    stride: tuple[int, int, int] = (18, 18, 4)
    config: str = "la_crln"
    run_overrides: tuple[str, ...] = ("train.log_every=25", "train.checkpoint_every=1000")
    # seconds of the budget each part may take at most (the run takes what is left)
    part_caps: dict[str, float] = field(
        default_factory=lambda: {
            "cuda_tests": 120,
            "step_times": 100,
            "step_times_compiled": 120,
            "data_path": 45,
            "inference": 60,
        }
    )
    eval_reserve_s: float = 75.0  # kept from training for the evaluation of the run
    min_train_s: float = 45.0


DRY_RUN = Settings(
    device="cpu",
    patch=(32, 16, 16),  # CPU bf16 3D convolutions are slow: about the smallest patch BatchNorm takes
    batch=(1, 1),
    n_filters=4,
    steps=1,
    warmup=0,
    compile_backend="eager",  # exercises the torch.compile path without a C++ compiler
    compiled_methods=("supervised",),  # tracing is slow on CPU: one network is enough to exercise it
    loader_setups=((0, False), (1, False)),
    loader_batches=2,
    max_simulated_step_s=0.05,
    stride=(16, 16, 16),
    run_overrides=(
        "data.patch_size=[32,32,32]",
        "data.labeled=3",
        "model.n_filters=4",
        "train.iterations=3",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "eval.stride=[16,16,16]",
        "method.num_anchors=16",
        "method.num_negatives=32",
    ),
    # a loaded CPU may be many times slower than usual: the dry run checks code paths, not speed
    part_caps=dict.fromkeys(("cuda_tests", "step_times", "step_times_compiled", "data_path", "inference"), 300.0),
    eval_reserve_s=10.0,
    min_train_s=1.0,
)


class OutOfTime(Exception):
    """Raised by the alarm when a part runs past the budget."""


class Clock:
    """The call's budget, counted from interpreter start (``device_io.STARTED``)."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = STARTED + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def arm(self, limit_s: float) -> Any:
        """Raise :class:`OutOfTime` in the running part after ``limit_s``, or ``GRACE_S`` past the deadline.

        A part's own checks stop it earlier; the alarm is for a step that cannot be interrupted
        otherwise (a ``torch.compile`` that takes minutes, a hung data worker). Returns the previous
        SIGALRM handler, for :meth:`disarm`.
        """
        seconds = max(1, int(min(limit_s, self.left() + GRACE_S)))

        def _expire(signum: int, frame: object) -> None:
            raise OutOfTime(f"stopped by the alarm after {seconds} s (its share of the budget)")

        previous = signal.signal(signal.SIGALRM, _expire)
        signal.alarm(seconds)
        return previous

    @staticmethod
    def disarm(previous: Any) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """``gpu_check.json`` and ``gpu_check.md`` in the output folder, rewritten after each part."""

    def __init__(self, out: Path, settings: Settings, budget_s: float, dry_run: bool) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": dry_run,
            "budget_s": budget_s,
            "settings": asdict(settings),
            "parts": {},
        }

    def record(self, name: str, result: dict[str, Any]) -> None:
        from crln.atomic import atomic_write_text

        self.data["parts"][name] = result
        self.data["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")
        atomic_write_text(self.out / "gpu_check.md", render_markdown(self.data))
        print(f"[{self.data['elapsed_s']:6.1f} s] {name}: {result['status']} {result.get('reason', '')}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# the parts


def part_environment(settings: Settings, data: dict[str, Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "data": {k: v for k, v in data.items() if k != "lists"}
        | {"lists": {name: f"{len(v['present'])}/{v['listed']}" for name, v in data["lists"].items()}},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        found = subprocess.run(query, capture_output=True, text=True, timeout=30)
        info["driver"] = found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout else None
    return info


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def part_cuda_tests(settings: Settings, seconds: float) -> dict[str, Any]:
    """``pytest -m cuda`` on the mixed-precision tests, in a subprocess that cannot outlive ``seconds``."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "failed", "reason": "pytest is not installed: carry its wheels in data/wheels (reproduce.md)"}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    command.append(str(REPO / "tests" / "test_mixed_precision.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), *(p for p in sys.path if p)]))  # + wheels
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"status": "failed", "reason": f"pytest ran past {seconds:.0f} s", "tail": tail[-2000:]}
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {
        kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _PYTEST_COUNTS.findall(summary)
    }
    ok = done.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")
    return {
        "status": "ok" if ok else "failed",
        "reason": summary,
        "counts": counts,
        "exit_code": done.returncode,
        "tail": (done.stdout + done.stderr)[-3000:],
    }


def part_step_times(settings: Settings, methods: tuple[str, ...], variants: list[Any], seconds: float) -> dict:
    """Median s/step per (method, variant), ratio to the mean teacher of the same variant, memory."""
    import torch
    from bench_step import time_steps

    stop_at = time.monotonic() + seconds
    results = time_steps(
        list(methods),
        variants,
        patch=settings.patch,
        batch=settings.batch,
        device=torch.device(settings.device),
        steps=settings.steps,
        warmup=settings.warmup,
        n_filters=settings.n_filters,
        compile_backend=settings.compile_backend,
        time_left=lambda: stop_at - time.monotonic(),
    )
    medians = {(r.method, r.variant): r.median for r in results}
    rows = []
    for r in results:
        reference = medians.get(("mean_teacher", r.variant))
        rows.append(
            {
                "method": r.method,
                "variant": r.variant,
                "median_s": r.median,
                "steps": len(r.seconds),
                "ratio_to_mean_teacher": r.median / reference if r.median and reference else None,
                "resident_mib": round(r.resident_mib, 1),
                "peak_step_mib": None if r.peak_step_mib is None else round(r.peak_step_mib, 1),
                "error": r.error,
            }
        )
    failed = [f"{r['method']} [{r['variant']}]" for r in rows if r["error"]]
    return {
        "status": "ok" if not failed else ("failed" if len(failed) == len(rows) else "partial"),
        "reason": f"errors in {', '.join(failed)}" if failed else "",
        "patch": list(settings.patch),
        "batch": list(settings.batch),
        "rows": rows,
    }


def _augment(config: Any) -> Any:
    from crln.data.transforms import AugmentConfig

    d = config.data
    return AugmentConfig(rot_flip=d.rot_flip, noise_sigma=d.noise_sigma, noise_clip=d.noise_clip)


def measure_data_wait(
    labeled: list[Any], unlabeled: list[Any], config: Any, *, workers: int, pin: bool, step_s: float, batches: int
) -> dict[str, Any]:
    """Data wait of the training loader when each batch is followed by ``step_s`` of (simulated) GPU work.

    The pause stands for a step whose kernels run on the GPU while the CPU waits; the wait of each
    ``next(loader)`` + copy to the device after the first batch (worker start-up, shown apart)
    is summed and divided by the window's wall time, as the trainer's ``data_wait_fraction``.
    """
    import torch

    from crln.data.loader import make_train_loader

    device = torch.device(config.train.device if config.train.device != "auto" else "cuda")
    d = config.data
    loader = make_train_loader(
        labeled,
        unlabeled,
        patch_size=d.patch_size,
        labeled_batch_size=d.labeled_batch_size,
        unlabeled_batch_size=d.unlabeled_batch_size,
        augment=_augment(config),
        seed=config.train.seed,
        num_steps=batches + 1,
        num_workers=workers,
        pin_memory=pin and device.type == "cuda",
    )
    start = time.perf_counter()
    batches_iter = iter(loader)
    next(batches_iter).to(device)
    first_s = time.perf_counter() - start
    wait, window_start = 0.0, time.perf_counter()
    for _ in range(batches):
        wait_start = time.perf_counter()
        next(batches_iter).to(device, non_blocking=True)
        wait += time.perf_counter() - wait_start
        time.sleep(step_s)
    fraction = wait / max(time.perf_counter() - window_start, 1e-9)
    return {"workers": workers, "pin_memory": pin, "first_batch_s": round(first_s, 3), "wait_fraction": fraction}


def part_data_path(settings: Settings, config: Any, data: dict[str, Any], step_s: float, seconds: float) -> dict:
    from crln.data.sources import open_dataset

    train_ids = data["lists"].get("train", {}).get("present", [])
    if len(train_ids) < 2:
        return {"status": "skipped", "reason": "fewer than 2 training cases carried (data/LA_compact/part1)"}
    dataset = open_dataset(config.data)
    labeled_count = min(config.data.labeled, len(train_ids) - 1)
    labeled = dataset.load_many(train_ids[:labeled_count], with_label=True)
    unlabeled = dataset.load_many(train_ids[labeled_count:], with_label=False)
    stop_at = time.monotonic() + seconds
    rows = []
    for workers, pin in settings.loader_setups:
        if rows and time.monotonic() + (step_s + 0.5) * (settings.loader_batches + 2) > stop_at:
            break
        rows.append(
            measure_data_wait(
                labeled, unlabeled, config, workers=workers, pin=pin, step_s=step_s, batches=settings.loader_batches
            )
        )
    preset = next((r for r in rows if (r["workers"], r["pin_memory"]) == settings.loader_setups[0]), rows[0])
    meeting = [r for r in rows if r["wait_fraction"] < DATA_WAIT_TARGET]
    if preset["wait_fraction"] < DATA_WAIT_TARGET:
        verdict = f"the preset loader ({preset['workers']} workers) keeps the wait under 5 %"
    elif meeting:
        best = min(meeting, key=lambda r: (r["workers"], not r["pin_memory"]))
        verdict = f"needs data.num_workers={best['workers']} data.pin_memory={str(best['pin_memory']).lower()}"
    else:
        most = max(r["workers"] for r in rows)
        verdict = f"no setup tried keeps it under 5 %: needs more than {most} workers or prefetching to the GPU"
    return {
        "status": "ok",
        "reason": verdict,
        "simulated_step_s": step_s,
        "cases": {"labeled": len(labeled), "unlabeled": len(unlabeled)},
        "rows": rows,
    }


def part_inference(settings: Settings, config: Any, data: dict[str, Any], seconds: float) -> dict[str, Any]:
    """s/volume of sliding-window inference, fp32 and bf16 + channels-last, on a random-weight network."""
    import torch

    from crln.data.sources import open_dataset
    from crln.engine.device import Performance
    from crln.inference import optimize_for_inference, predict_case
    from crln.models import VNet

    test_ids = data["lists"].get("test", {}).get("present", [])
    if not test_ids:
        return {"status": "skipped", "reason": "no test case carried (data/LA_compact/part3)"}
    device = torch.device(settings.device)
    torch.manual_seed(0)
    network = VNet(n_filters=settings.n_filters).to(device).eval()
    variants = {}
    for name, (amp, layout) in {"fp32": ("none", "off"), "bf16 + channels-last": ("bf16", "on")}.items():
        perf = Performance.for_device(device, amp, layout)
        perf.apply_cuda_tuning()  # as crln predict does
        fast = optimize_for_inference(network, device)  # CPU: a folded copy; CUDA: the network itself
        fast = copy.deepcopy(fast).to(memory_format=torch.channels_last_3d) if perf.channels_last else fast
        variants[name] = (perf, fast)
    dataset = open_dataset(config.data)
    times: dict[str, list[float]] = {name: [] for name in variants}
    agreement: list[float] = []
    stop_at = time.monotonic() + seconds
    for case_id in test_ids:
        if times["fp32"] and time.monotonic() > stop_at:
            break
        image = dataset.load(case_id, with_label=False).image
        labels = {}
        for name, (perf, fast) in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            labels[name], _ = predict_case(
                lambda x, fast=fast, perf=perf: fast(perf.input(x)),
                image,
                patch_size=config.data.patch_size,
                stride=settings.stride,
                num_classes=config.data.num_classes,
                sw_batch_size=config.eval.sw_batch_size,
                device=device,
                amp_dtype=perf.amp_dtype,
            )
            times[name].append(time.perf_counter() - start)
        agreement.append(float((labels["fp32"] == labels["bf16 + channels-last"]).mean()))
    return {
        "status": "ok",
        "reason": f"{len(agreement)}/{len(test_ids)} test cases",
        "stride": list(settings.stride),
        "volume_shape_first": list(image.shape),
        "seconds_per_volume": {name: statistics.median(v) for name, v in times.items()},
        "argmax_agreement_min": min(agreement),
        "note": "random weights: the agreement of a trained network is a cuda test",
    }


def part_crln_run(
    settings: Settings, config: Any, data: dict[str, Any], clock: Clock, eval_s_per_case: float | None
) -> dict[str, Any]:
    """Train ``la_crln`` until the budget (resuming an earlier call's run), evaluate, read its own log."""
    from crln.engine.run_folder import read_log
    from crln.engine.trainer import train
    from crln.evaluation import evaluate

    train_ids = data["lists"].get("train", {}).get("present", [])
    if len(train_ids) <= config.data.labeled:
        return {"status": "skipped", "reason": f"{len(train_ids)} training cases carried, need > {config.data.labeled}"}
    budget = clock.left() - settings.eval_reserve_s
    if budget < settings.min_train_s:
        return {"status": "skipped", "reason": f"{clock.left():.0f} s left, too few to train"}
    from crln.engine.run_folder import RunFolder

    run_dir = RunFolder.for_config(config).path
    resume = (run_dir / "checkpoint_latest.pt").is_file()
    started = time.monotonic()
    trained = train(config, resume=resume, progress=False, time_budget_s=budget)
    result: dict[str, Any] = {
        "status": "ok",
        "run_dir": str(trained.run_dir),
        "resumed": resume,
        "iterations": trained.steps,
        "of": config.train.iterations,
        "train_s": round(time.monotonic() - started, 1),
    }
    windows = [r for r in read_log(trained.run_dir / "log.jsonl") if "seconds_per_iteration" in r]
    later = windows[1:] or windows
    if later:
        result["seconds_per_iteration"] = statistics.median(r["seconds_per_iteration"] for r in later)
        result["data_wait_fraction"] = statistics.median(r["data_wait_fraction"] for r in later)
        result["last_loss"] = later[-1].get("loss")
    test_ids = data["lists"].get("test", {}).get("present", [])
    per_case = (eval_s_per_case or 5.0) * 1.5 + 1.0  # inference + metrics, with margin
    fit = min(len(test_ids), int((clock.left() - 5.0) / per_case))
    if fit < 1:
        result["reason"] = "evaluation skipped: no test case carried or no time left"
        return result
    started = time.monotonic()
    evaluated = evaluate(
        trained.run_dir, checkpoint="latest", split="test", limit=fit, progress=False, device=config.train.device
    )
    summary = evaluated["summary"]
    result["evaluation"] = {
        "cases": fit,
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
    }
    result["reason"] = f"{trained.steps} iterations, evaluated on {fit}/{len(test_ids)} test cases"
    return result


# ----------------------------------------------------------------------------------------------------------
# the Markdown summary


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The JSON report as a page a person reads first: one section per part, tables where they help."""
    lines = [
        f"# GPU check{' (dry run on CPU)' if report['dry_run'] else ''}",
        "",
        f"Started {report['started']}, budget {report['budget_s']:.0f} s, {report.get('elapsed_s', 0):.0f} s so far.",
    ]
    for name, part in report["parts"].items():
        lines += ["", f"## {name}: {part['status']}", ""]
        if part.get("reason"):
            lines += [part["reason"], ""]
        if name.startswith("step_times") and part.get("rows"):
            lines += [
                "| method | variant | median s/step | × mean teacher | steps | resident MiB | peak step MiB | error |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['variant']} | {_fmt(r['median_s'])} | {_fmt(r['ratio_to_mean_teacher'], 2)} "
                f"| {r['steps']} | {_fmt(r['resident_mib'], 1)} | {_fmt(r['peak_step_mib'], 1)} | {r['error'] or ''} |"
                for r in part["rows"]
            ]
        elif name == "data_path" and part.get("rows"):
            lines += [f"Simulated step: {part['simulated_step_s']:.3f} s.", ""]
            lines += ["| workers | pin memory | first batch s | data wait % of step |", "|---|---|---|---|"]
            lines += [
                f"| {r['workers']} | {r['pin_memory']} | {r['first_batch_s']:.2f} | {100 * r['wait_fraction']:.2f} |"
                for r in part["rows"]
            ]
        else:
            shown = {k: v for k, v in part.items() if k not in ("status", "reason", "tail")}
            lines += [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in shown.items()]
            if part.get("tail") and part["status"] != "ok":
                lines += ["", "```", part["tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# running the parts


def _run_part(
    report: Report, name: str, action: Callable[[], dict[str, Any]], clock: Clock, limit_s: float
) -> dict[str, Any]:
    """Run one part for at most ``limit_s``; an exception or the alarm becomes its result, the check goes on."""
    started = time.monotonic()
    previous = clock.arm(limit_s)
    try:
        result = action()
    except OutOfTime as err:
        result = {"status": "failed", "reason": str(err)}
    except Exception as err:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
        result = {"status": "failed", "reason": reason, "tail": traceback.format_exc()[-3000:]}
    finally:
        clock.disarm(previous)
    result.setdefault("status", "ok")
    result["seconds"] = round(time.monotonic() - started, 1)
    report.record(name, result)
    return result


def _skip(report: Report, name: str, reason: str) -> None:
    report.record(name, {"status": "skipped", "reason": reason, "seconds": 0.0})


def _dry_run_data(work: Path) -> Path:
    """Phantom cases compacted into parts, standing for the carried ``data/LA_compact/part*``."""
    from crln.data.compact import compact_h5_dataset
    from crln.data.phantom import write_phantom_h5_dataset

    source = write_phantom_h5_dataset(work / "phantom_h5", n_train=6, n_test=2, shape=(40, 40, 32), seed=0)
    compact_h5_dataset(source, work / "carried" / "LA_compact", max_part_mib=0.25)
    return work / "carried" / "LA_compact"


def _run_config(settings: Settings, data: dict[str, Any], work: Path, dry_run: bool) -> Any:
    from crln.config import load_config

    overrides = [
        f"data.root={data['root']}",
        f"train.output_dir={work / 'runs'}",
        f"train.device={settings.device}",
        "train.tag=gpu_check",
        *settings.run_overrides,
    ]
    if dry_run:
        overrides += ["data.num_workers=0", "data.pin_memory=false", "data.name=phantom"]
    return load_config(settings.config, overrides)


def _present_view(data: dict[str, Any], work: Path) -> dict[str, Any]:
    """With parts missing, a folder whose case lists name only the cases present (cases linked, not copied)."""
    if data["complete"] or data["root"] is None:
        return data
    root, view = Path(data["root"]), work / "data" / "present_view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    shutil.copyfile(root / "crln_compact.json", view / "crln_compact.json")
    (view / "cases").symlink_to(root / "cases", target_is_directory=True)
    for name, listed in data["lists"].items():
        (view / f"{name}.list").write_text("".join(f"{cid}\n" for cid in listed["present"]))
    return {**data, "root": str(view)}


def run_check(args: argparse.Namespace) -> Report:
    settings = DRY_RUN if args.dry_run else Settings()
    clock = Clock(args.budget_s)
    out = Path(args.out)
    work = Path(args.work or (tempfile.mkdtemp(prefix="gpu_check_") if args.dry_run else WORK))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        install_wheels(Path(args.wheels), work / "site")
    import_crln(work / "site")
    report = Report(out, settings, args.budget_s, args.dry_run)
    import torch

    threads = torch.get_num_threads()
    if args.dry_run:  # one thread: tiny tensors gain nothing from more, and a shared CPU stays usable
        torch.set_num_threads(1)
    try:
        _run_parts(report, settings, clock, args, work)
    finally:
        torch.set_num_threads(threads)
        if args.dry_run and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _run_parts(report: Report, settings: Settings, clock: Clock, args: argparse.Namespace, work: Path) -> None:
    import torch
    from bench_step import Variant

    data_src = _dry_run_data(work) if args.dry_run else Path(args.data_src)
    data = _present_view(stage_data(data_src, work / "data" / data_src.name), work)
    environment = _run_part(report, "environment", lambda: part_environment(settings, data), clock, 60.0)
    if settings.device == "cuda" and not environment.get("cuda_available"):
        for name in ("cuda_tests", "step_times", "step_times_compiled", "data_path", "inference", "crln_run"):
            _skip(report, name, "CUDA is not available on this machine (use --dry-run on a CPU)")
        return

    def cap(name: str) -> float:
        return min(settings.part_caps[name], max(clock.left() - 60.0, 0.0))

    def run(name: str, action: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        seconds = cap(name)  # the part's own stop; the alarm follows GRACE_S later
        return _run_part(report, name, lambda: action(seconds), clock, seconds + GRACE_S)

    run("cuda_tests", lambda s: part_cuda_tests(settings, max(s, 10.0)))
    torch.manual_seed(0)
    variants = [Variant("fp32"), Variant("bf16", amp="bf16"), Variant("bf16 + channels-last", "bf16", "on")]
    steps = run("step_times", lambda s: part_step_times(settings, METHODS, variants, s))
    compiled = [Variant("bf16 + channels-last + compile", "bf16", "on", compile=True)]
    if cap("step_times_compiled") < 30.0 and not args.dry_run:
        _skip(report, "step_times_compiled", f"{clock.left():.0f} s left")
    else:
        run("step_times_compiled", lambda s: part_step_times(settings, settings.compiled_methods, compiled, s))
    crln_step = next(
        (
            r["median_s"]
            for r in steps.get("rows", [])
            if r["method"] == "crln" and r["median_s"] and "channels" in r["variant"]
        ),
        None,
    )
    config = _run_config(settings, data, work, args.dry_run) if data["root"] else None
    if config is None:
        for name in ("data_path", "inference", "crln_run"):
            _skip(report, name, "no data carried (data/LA_compact/part*)")
        return
    step_s = min(crln_step or 0.3, settings.max_simulated_step_s)  # 0.3 s: a guess when the step was not timed
    run("data_path", lambda s: part_data_path(settings, config, data, step_s, s))
    inference = run("inference", lambda s: part_inference(settings, config, data, s))
    per_case = inference.get("seconds_per_volume", {}).get("bf16 + channels-last")
    action = lambda: part_crln_run(settings, config, data, clock, per_case)  # noqa: E731
    _run_part(report, "crln_run", action, clock, clock.left() + GRACE_S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where gpu_check.json and gpu_check.md go (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU with tiny sizes and phantom data")
    parser.add_argument("--data-src", default="data/LA_compact", help="carried compact folder or its part* folders")
    parser.add_argument("--wheels", default="data/wheels", help="carried wheels (monai, nibabel)")
    parser.add_argument(
        "--work", help=f"working folder, kept while the machine is warm (default {WORK}; a temporary one in a dry run)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out or os.environ.get("OUT")
    if not args.out:
        print("gpu_check: error: no output folder: pass --out or set $OUT", file=sys.stderr)
        return 2
    try:
        report = run_check(args)
    except TransferError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    failed = [name for name, part in report.data["parts"].items() if part["status"] == "failed"]
    print(f"gpu_check: {len(report.data['parts'])} parts, failed: {', '.join(failed) or 'none'}; see {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
