"""Training-step time per method, measured in one process with the methods interleaved.

Usage: python benchmarks/bench_step.py [--methods supervised mean_teacher crln] [--patch 64 64 48]
       [--batch 2 2] [--steps 5] [--warmup 2] [--device cpu|cuda] [--amp none|bf16]
       [--channels-last auto|on|off ...] [--set METHOD.key=value ...] [--allocator tuned|system] [--profile N]

One step = the method's ``train_step`` (forward passes and losses), backward, SGD step and
``after_optimizer_step`` (EMA, CRLN's μ step), exactly as the engine runs it, on random tensors of
the given patch (no data loading). Prints the median seconds per step of each method and its ratio
to mean_teacher in the same layout (the reference of the CRLN step-time target); with several
``--channels-last`` layouts, also each method's speed-up over the first layout. ``--profile N`` then runs one more
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
        nargs="+",
        default=["auto"],
        choices=["auto", "on", "off"],
        help="channels_last_3d layout of weights and inputs (auto: on); several, e.g. `off on`, are interleaved",
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
    layouts = list(dict.fromkeys(args.channels_last))
    methods, optimizers, perfs, batches = {}, {}, {}, {}
    for layout in layouts:
        perf = perfs[layout] = Performance.for_device(device, args.amp, layout)
        batch = _batch(tuple(args.patch), *args.batch, device)
        batch.labeled_image, batch.unlabeled_image = perf.input(batch.labeled_image), perf.input(batch.unlabeled_image)
        batches[layout] = batch
        for name in args.methods:
            torch.manual_seed(0)
            fields = {
                k.split(".", 1)[1]: yaml.safe_load(v)
                for k, v in (i.split("=", 1) for i in args.set)
                if k.startswith(f"{name}.")
            }
            config = method_config_class(name)(name=name, **fields)
            method = perf.place(build_method(config, lambda: VNet(), 2)).train()
            methods[name, layout] = method
            optimizers[name, layout] = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)

    def one_step(key: tuple[str, str], step: int) -> float:
        method, optimizer, perf = methods[key], optimizers[key], perfs[key[1]]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with perf.autocast():
            out = method.train_step(batches[key[1]], step)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[tuple[str, str], list[float]] = {key: [] for key in methods}
    for step in range(args.warmup + args.steps):
        for key in methods:  # interleaved: load changes hit every method and layout alike
            # Iterations past CRLN's S = 800, so its rectification stage (teacher DIM) is timed too.
            elapsed = one_step(key, step + 1000)
            if step >= args.warmup:
                times[key].append(elapsed)
    amp = perfs[layouts[0]].amp_dtype
    print(
        f"device {device} ({torch.get_num_threads()} threads), amp {amp}, patch {tuple(args.patch)}, "
        f"batch {args.batch[0]}+{args.batch[1]}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    medians = {key: statistics.median(values) for key, values in times.items()}
    first = layouts[0]
    for (name, layout), median in medians.items():
        perf = perfs[layout]
        line = f"{name:>14} [channels_last {'on' if perf.channels_last else 'off'}]: {median:.3f} s/step"
        if ("mean_teacher", layout) in medians:
            line += f"   {median / medians['mean_teacher', layout]:.2f}x mean_teacher"
        if layout != first:
            line += f"   {medians[name, first] / median:.2f}x faster than channels_last {first}"
        print(line)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for key in methods:
            with profile(activities=activities) as prof:
                one_step(key, args.warmup + args.steps + 1000)
            sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{key[0]} [channels_last {key[1]}]: {args.profile} costliest operators of one step")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile))


if __name__ == "__main__":
    main()
