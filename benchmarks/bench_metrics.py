"""ASD + 95HD per volume: crln.metrics against medpy.metric.binary, same inputs, same run.

Usage: python benchmarks/bench_metrics.py [--data ../shared/data/LA] [--cases 10] [--repeats 5]

Predictions are the real LA labels dilated, eroded and shifted (a realistic surface mismatch).
Three implementations run interleaved, after one untimed warm-up round: medpy's ``asd`` + ``hd95``
(what the field's scripts call), crln's ``asd`` + ``hd95`` called separately, and crln's
``asd_and_hd95`` (one computation of the surface distances, what ``crln evaluate`` uses). Prints
the median seconds per volume of each over the repeats, the ratio to medpy, and the largest
absolute difference of the values from medpy's (must be 0 up to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from crln.data.h5 import H5Dataset
from crln.metrics import asd, asd_and_hd95, hd95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from medpy.metric import binary  # test-only dependency (GPL-3.0): the reference, never imported by crln

    dataset = H5Dataset(args.data)
    pairs = []
    for i, case_id in enumerate(dataset.ids("test")[: args.cases]):
        gt = dataset.load(case_id).label.astype(bool)
        pred = ndimage.binary_dilation(gt, iterations=2) if i % 2 else ndimage.binary_erosion(gt, iterations=2)
        pairs.append((np.roll(pred, 2 + i % 3, axis=i % 3), gt))

    implementations = {
        "medpy asd + hd95": lambda pred, gt: (binary.asd(pred, gt), binary.hd95(pred, gt)),
        "crln asd + hd95 (separate calls)": lambda pred, gt: (asd(pred, gt), hd95(pred, gt)),
        "crln asd_and_hd95 (one pass)": asd_and_hd95,
    }
    times: dict[str, list[float]] = {name: [] for name in implementations}
    values: dict[str, list[float]] = {}
    for round_index in range(1 + args.repeats):  # round 0 warms up; interleaved so that load hits all alike
        for name, both in implementations.items():
            start, results = time.perf_counter(), []
            for pred, gt in pairs:
                results.extend(both(pred, gt))
            if round_index:
                times[name].append((time.perf_counter() - start) / len(pairs))
            values[name] = results
    reference = "medpy asd + hd95"
    reference_median = statistics.median(times[reference])
    print(f"cases: {len(pairs)}  timed repeats: {args.repeats} (after 1 warm-up round)")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        diff = max(abs(a - b) for a, b in zip(values[name], values[reference]))
        print(f"{name:34s} {median:.4f} s/volume   ratio {reference_median / median:5.1f}x   max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
