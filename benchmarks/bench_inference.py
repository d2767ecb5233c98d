"""Sliding-window inference of LA test volumes: crln (batched windows) against the field's loop.

Usage: python benchmarks/bench_inference.py [--data DIR] [--patch 112 112 80] [--stride 18 18 4]
       [--cases 1] [--repeats 5] [--warmup 1] [--sw-batch-size 4] [--device cpu|cuda]
       [--variants reference crln ...] [--checkpoint CHECKPOINT.pt]

The reference is the one-window-at-a-time loop of tests/reference_sliding_window.py (a port of
the field's ``test_single_case``) on the network as trained. The variants, run interleaved on the
same volumes (after ``--warmup`` untimed rounds), are:

- ``reference``: the field's loop, one window per forward pass;
- ``crln``: what ``crln evaluate`` runs, :func:`crln.inference.optimize_for_inference` (on CPU:
  BatchNorm folded into the convolutions, ``channels_last_3d``) + :func:`crln.inference.predict_case`'s
  tiling with ``--sw-batch-size`` windows per forward pass;
- ``crln-unoptimized``: the same batched tiling on the network as trained;
- ``crln-fold``: BatchNorm folded, default memory format;
- ``crln-channels-last``: ``channels_last_3d`` only, BatchNorm kept.

The network is the field-standard VNet with random weights (BatchNorm statistics randomised so that
folding is exercised), or a trained one with ``--checkpoint``. The script prints the median seconds
per volume of each variant, its ratio to the reference, the largest probability difference and the
number of voxels whose argmax differs from the reference (identical predictions are required),
with the largest gap between the reference's two top probabilities at such voxels (a gap at the
float32 rounding level means a tie that any change of summation order can flip).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from crln.data.h5 import H5Dataset  # noqa: E402
from crln.engine.allocator import ALLOCATOR_ENV, tune_cpu_allocator  # noqa: E402
from crln.inference import optimize_for_inference, sliding_window_predict  # noqa: E402
from crln.models import VNet  # noqa: E402
from reference_sliding_window import reference_sliding_window, window_starts  # noqa: E402

VARIANTS = ("reference", "crln", "crln-unoptimized", "crln-fold", "crln-channels-last")


def _network(checkpoint: str | None, device: torch.device) -> nn.Module:
    """The trained inference network of ``checkpoint``, else a random VNet with non-trivial BatchNorm statistics."""
    if checkpoint is not None:  # the run's eval.network as trained (crln.predictor.Predictor would optimise it)
        from crln.engine.checkpoint import load_checkpoint
        from crln.predictor import network_from_checkpoint

        network, _ = network_from_checkpoint(load_checkpoint(Path(checkpoint), map_location="cpu"))
        return network.eval().to(device)
    torch.manual_seed(0)
    model = VNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):  # trained-looking statistics, so that folding them matters
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval().to(device)


def _variant_network(name: str, model: nn.Module, device: torch.device) -> nn.Module:
    """The network a variant runs (see the module docstring)."""
    if name == "crln":
        return optimize_for_inference(model, device)
    if name == "crln-fold":
        return optimize_for_inference(model, device).to(memory_format=torch.contiguous_format)
    if name == "crln-channels-last":
        return copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "LA"))
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--stride", type=int, nargs=3, default=[18, 18, 4])
    parser.add_argument("--cases", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["reference", "crln"])
    parser.add_argument("--checkpoint", default=None, help="checkpoint file of a trained network")
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
    model = _network(args.checkpoint, device)
    dataset = H5Dataset(args.data)
    volumes = [dataset.load(cid, with_label=False).image for cid in dataset.ids("test")[: args.cases]]

    def runner(name: str) -> Callable[[np.ndarray], torch.Tensor]:
        start = time.perf_counter()
        network = _variant_network(name, model, device)
        if name != "reference":
            print(f"{name}: network prepared in {time.perf_counter() - start:.3f} s")
        if name == "reference":
            return lambda image: torch.from_numpy(
                reference_sliding_window(lambda x: network(x.to(device)).cpu(), image, args.patch, args.stride, 2)[0]
            )
        return lambda image: sliding_window_predict(
            network,
            image,
            patch_size=args.patch,
            stride=args.stride,
            num_classes=2,
            sw_batch_size=args.sw_batch_size,
            device=device,
        )

    runners = {name: runner(name) for name in dict.fromkeys(["reference", *args.variants])}
    times: dict[str, list[float]] = {name: [] for name in runners}
    max_diff = dict.fromkeys(runners, 0.0)
    differing = dict.fromkeys(runners, 0)
    tie_margin = dict.fromkeys(runners, 0.0)  # largest reference top-2 gap among the voxels that differ
    with torch.inference_mode():
        for round_index in range(args.warmup + args.repeats):
            for image in volumes:  # variants interleaved, so that load changes hit all alike
                probs = {}
                for name, run in runners.items():
                    start = time.perf_counter()
                    probs[name] = run(image)
                    if round_index >= args.warmup:
                        times[name].append(time.perf_counter() - start)
                reference_labels = probs["reference"].argmax(0)
                top2 = probs["reference"].topk(2, dim=0).values
                for name, p in probs.items():
                    max_diff[name] = max(max_diff[name], float((p - probs["reference"]).abs().max()))
                    other = p.argmax(0) != reference_labels
                    differing[name] = max(differing[name], int(other.sum()))
                    if other.any():
                        gap = float((top2[0] - top2[1])[other].max())
                        tie_margin[name] = max(tie_margin[name], gap)
    windows = math.prod(
        len(window_starts(max(size, patch), patch, step))
        for size, patch, step in zip(volumes[0].shape, args.patch, args.stride)
    )
    print(
        f"volume {tuple(volumes[0].shape)}, patch {args.patch}, stride {args.stride}, {windows} windows, "
        f"device {device}, torch threads {torch.get_num_threads()}, sw_batch_size {args.sw_batch_size}, "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}, "
        f"{len(times['reference'])} timed runs per variant after {args.warmup} warm-up round(s)"
    )
    reference_median = statistics.median(times["reference"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:20s} {median:8.2f} s/volume   ratio {reference_median / median:5.2f}x   "
            f"max |p - p_ref| {max_diff[name]:.1e}   voxels with another argmax (most in one volume): {differing[name]}"
            + (f" (reference top-2 gap there <= {tie_margin[name]:.1e})" if differing[name] else "")
        )


if __name__ == "__main__":
    main()
