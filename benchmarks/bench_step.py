"""Training-step time per method, measured in one process with the methods interleaved.

Usage: python benchmarks/bench_step.py [--methods supervised mean_teacher crln] [--patch 64 64 48]
       [--batch 2 2] [--steps 5] [--warmup 2] [--device cpu|cuda] [--amp none|bf16]
       [--channels-last auto|on|off] [--set METHOD.key=value ...] [--allocator tuned|system] [--profile N]

One step = the method's ``train_step`` (forward passes and losses), backward, SGD step and
``after_optimizer_step`` (EMA, CRLN's μ step), exactly as the engine runs it, on random tensors of
the given patch (no data loading). Prints the median seconds per step of each method and its ratio
to mean_teacher (the reference of the CRLN step-time target). ``--profile N`` then runs one more
step of each method under ``torch.profiler`` and prints its N most expensive operators (self time),
to see where a method's extra time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import yaml

from crln.data.loader import Batch
from crln.engine.allocator import ALLOCATOR_ENV, tune_cpu_allocator
from crln.engine.device import Performance
from crln.methods import build_method, method_config_class
from crln.models import VNet


def _batch(patch: tuple[int, int, int], labeled: int, unlabeled: int, device: torch.device) -> Batch:
    label = torch.zeros(labeled, *patch, dtype=torch.int64)
    h, w, d = patch
    label[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, d // 4 : 3 * d // 4] = 1
    image = torch.randn(labeled, 1, *patch) * 0.5 + label[:, None].float()
    return Batch(image, label, torch.randn(unlabeled, 1, *patch)).to(device)


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
        default="auto",
        choices=["auto", "on", "off"],
        help="channels_last_3d layout of weights and inputs (auto: on for CUDA, off for CPU)",
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
    perf = Performance.for_device(device, args.amp, args.channels_last)
    patch = tuple(args.patch)
    batch = _batch(patch, *args.batch, device)
    batch.labeled_image, batch.unlabeled_image = perf.input(batch.labeled_image), perf.input(batch.unlabeled_image)
    methods, optimizers = {}, {}
    for name in args.methods:
        torch.manual_seed(0)
        fields = {
            k.split(".", 1)[1]: yaml.safe_load(v)
            for k, v in (i.split("=", 1) for i in args.set)
            if k.startswith(f"{name}.")
        }
        method = perf.place(build_method(method_config_class(name)(name=name, **fields), lambda: VNet(), 2)).train()
        methods[name] = method
        optimizers[name] = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)

    def one_step(name: str, step: int) -> float:
        method, optimizer = methods[name], optimizers[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with perf.autocast():
            out = method.train_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in range(args.warmup + args.steps):
        for name in methods:  # interleaved: load changes hit every method alike
            # Iterations past CRLN's S = 800, so its rectification stage (teacher DIM) is timed too.
            elapsed = one_step(name, step + 1000)
            if step >= args.warmup:
                times[name].append(elapsed)
    print(
        f"device {device} ({torch.get_num_threads()} threads), amp {perf.amp_dtype}, "
        f"channels_last {perf.channels_last}, patch {patch}, "
        f"batch {args.batch[0]}+{args.batch[1]}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    reference = statistics.median(times["mean_teacher"]) if "mean_teacher" in times else None
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"   {median / reference:.2f}x mean_teacher" if reference else ""
        print(f"{name:>14}: {median:.3f} s/step{ratio}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name in methods:
            with profile(activities=activities) as prof:
                one_step(name, args.warmup + args.steps + 1000)
            sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{name}: {args.profile} costliest operators of one step")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile))


if __name__ == "__main__":
    main()
