"""Training-step time per method, measured in one process with the methods interleaved.

Usage: python benchmarks/bench_step.py [--methods supervised mean_teacher crln] [--patch 64 64 48]
       [--batch 2 2] [--steps 5] [--warmup 2] [--device cpu|cuda] [--amp none|bf16]
       [--channels-last auto|on|off ...] [--compile] [--set METHOD.key=value ...]
       [--allocator tuned|system] [--profile N]

One step = the method's ``train_step`` (forward passes and losses), backward, SGD step,
``after_optimizer_step`` (EMA, CRLN's μ gradient) and the method's own optimisers (μ), exactly as
the engine runs it, on random tensors of the given patch (no data loading). Prints the median seconds
per step of each method and its ratio to mean_teacher in the same layout (the reference of the CRLN
step-time target); with several ``--channels-last`` layouts, also each method's speed-up over the
first layout. ``--profile N`` then runs one more step of each method under ``torch.profiler`` and
prints its N most expensive operators (self time), to see where a method's extra time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from crln.config import OptimConfig
from crln.data.batch import Batch
from crln.engine.allocator import ALLOCATOR_ENV, tune_cpu_allocator
from crln.engine.device import Performance
from crln.engine.trainer import step_extra_optimizers
from crln.methods import Method, build_method, method_config_class
from crln.models import VNet

MIB = 2**20


@dataclass(frozen=True)
class Variant:
    """One way of running the step: autocast dtype, memory format, ``torch.compile`` of the networks."""

    name: str
    amp: str = "none"  # as train.amp: auto, none, bf16, fp16
    channels_last: str = "off"  # as train.channels_last: auto, on, off
    compile: bool = False


@dataclass
class StepTimes:
    """Seconds per step of one (method, variant), and its memory on CUDA."""

    method: str
    variant: str
    seconds: list[float] = field(default_factory=list)
    resident_mib: float = 0.0  # parameters, buffers, gradients and optimiser state
    peak_step_mib: float | None = None  # CUDA only: the step's peak allocation above the resting memory
    error: str | None = None
    profile: str | None = None  # the costliest operators of one more step, when asked

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def _batch(patch: tuple[int, int, int], labeled: int, unlabeled: int, device: torch.device) -> Batch:
    label = torch.zeros(labeled, *patch, dtype=torch.int64)
    h, w, d = patch
    label[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, d // 4 : 3 * d // 4] = 1
    image = torch.randn(labeled, 1, *patch) * 0.5 + label[:, None].float()
    return Batch(image, label, torch.randn(unlabeled, 1, *patch)).to(device)


def _resident_mib(method: Method, optimizer: torch.optim.Optimizer) -> float:
    tensors = [*method.parameters(), *method.buffers()]
    tensors += [p.grad for p in method.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def time_steps(
    methods: list[str],
    variants: list[Variant],
    *,
    patch: tuple[int, int, int],
    batch: tuple[int, int],
    device: torch.device,
    steps: int = 5,
    warmup: int = 2,
    n_filters: int = 16,
    overrides: dict[str, dict[str, Any]] | None = None,
    compile_backend: str = "inductor",
    time_left: Callable[[], float] | None = None,
    profile_rows: int = 0,
) -> list[StepTimes]:
    """Median-ready step times of every (method, variant), interleaved step by step.

    One step is the method's ``train_step`` under the variant's autocast, backward (through a
    GradScaler, active for fp16), SGD step and ``after_optimizer_step``, on random tensors ``(B, 1,
    *patch)``. Steps are numbered past CRLN's S = 800 so its rectification stage is timed too.
    A (method, variant) that fails (e.g. ``torch.compile`` without a compiler) gets ``error``; with
    ``time_left``, rounds stop once it reaches zero (the medians of the rounds done are kept).
    ``profile_rows`` > 0 runs one more step of each under ``torch.profiler`` and keeps its costliest operators.
    """
    overrides = overrides or {}
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    results: dict[tuple[str, str], StepTimes] = {}
    for variant in variants:
        perf = Performance.for_device(device, variant.amp, variant.channels_last)
        perf.apply_cuda_tuning()  # as training does (a whole process: no flags to give back)
        data = _batch(patch, *batch, device)
        data.labeled_image, data.unlabeled_image = perf.input(data.labeled_image), perf.input(data.unlabeled_image)
        for name in methods:
            torch.manual_seed(0)
            config = method_config_class(name)(name=name, **overrides.get(name, {}))
            method = perf.place(build_method(config, lambda: VNet(n_filters=n_filters), 2)).train()
            if variant.compile:
                perf.compile_networks(method, compile_backend)
            optimizers = method.configure_optimizers(OptimConfig(lr=1e-3, momentum=0.9, weight_decay=0.0))
            scaler = torch.amp.GradScaler(device.type, enabled=perf.amp_dtype == torch.float16)
            runs[name, variant.name] = {"method": method, "optimizers": optimizers, "scaler": scaler, "perf": perf}
            runs[name, variant.name]["batch"] = data
            results[name, variant.name] = StepTimes(name, variant.name)

    def one_step(key: tuple[str, str], step: int) -> float:
        run = runs[key]
        method, optimizers, scaler = run["method"], run["optimizers"], run["scaler"]
        optimizer = optimizers.main
        if device.type == "cuda":
            torch.cuda.synchronize()
            resting = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with run["perf"].autocast():
            out = method.train_step(run["batch"], step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        method.after_optimizer_step(step)
        step_extra_optimizers(optimizers, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated(device) - resting) / MIB
            results[key].peak_step_mib = max(results[key].peak_step_mib or 0.0, peak)
        return time.perf_counter() - start

    for step in range(warmup + steps):
        if time_left is not None and step > warmup and time_left() <= 0:
            break
        for key, result in results.items():  # interleaved: load changes hit every method and variant alike
            if result.error is not None:
                continue
            try:
                elapsed = one_step(key, step + 1000)
            except Exception as err:  # a variant that does not work here is reported, not fatal
                result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                continue
            if step >= warmup:
                result.seconds.append(elapsed)
    for key, result in results.items():
        result.resident_mib = _resident_mib(runs[key]["method"], runs[key]["optimizers"].main)
        if profile_rows and result.error is None:
            result.profile = _profile(lambda key=key: one_step(key, warmup + steps + 1000), device, profile_rows)
    return list(results.values())


def _profile(step: Callable[[], float], device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "crln"])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"])
    parser.add_argument(
        "--channels-last",
        nargs="+",
        default=["auto"],
        choices=["auto", "on", "off"],
        help="channels_last_3d layout of weights and inputs (auto: on); several, e.g. `off on`, are interleaved",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time each layout with the networks under torch.compile"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="METHOD.key=value",
        help="method hyper-parameters, e.g. crln.mu_step_input=current (values parsed as YAML)",
    )
    parser.add_argument(
        "--allocator",
        choices=["tuned", "system"],
        default="tuned",
        help="CPU heap settings: crln's (tuned, what `crln` runs with) or the C library's defaults (system)",
    )
    args = parser.parse_args()
    os.environ[ALLOCATOR_ENV] = args.allocator
    print(f"cpu allocator: {tune_cpu_allocator()}")

    device = torch.device(args.device)
    variants = [Variant(f"channels_last {layout}", args.amp, layout) for layout in dict.fromkeys(args.channels_last)]
    if args.compile:
        variants += [Variant(f"{v.name} + compile", v.amp, v.channels_last, compile=True) for v in variants]
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in (i.split("=", 1) for i in args.set):
        method_name, field_name = key.split(".", 1)
        overrides.setdefault(method_name, {})[field_name] = yaml.safe_load(value)
    results = time_steps(
        args.methods,
        variants,
        patch=tuple(args.patch),
        batch=tuple(args.batch),
        device=device,
        steps=args.steps,
        warmup=args.warmup,
        overrides=overrides,
        profile_rows=args.profile,
    )
    amp = Performance.for_device(device, args.amp).amp_dtype
    print(
        f"device {device} ({torch.get_num_threads()} threads), amp {amp}, patch {tuple(args.patch)}, "
        f"batch {args.batch[0]}+{args.batch[1]}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    medians = {(r.method, r.variant): r.median for r in results}
    first = variants[0].name
    for (name, variant), median in medians.items():
        line = f"{name:>14} [{variant}]: {median:.3f} s/step"
        if ("mean_teacher", variant) in medians:
            line += f"   {median / medians['mean_teacher', variant]:.2f}x mean_teacher"
        if variant != first:
            line += f"   {medians[name, first] / median:.2f}x faster than {first}"
        print(line)
    for result in results:
        if result.profile:
            print(f"\n{result.method} [{result.variant}]: {args.profile} costliest operators of one step")
            print(result.profile)


if __name__ == "__main__":
    main()
