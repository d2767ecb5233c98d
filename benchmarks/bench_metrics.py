"""ASD + 95HD per volume: crln.metrics against medpy.metric.binary, same inputs, same run.

Usage: python benchmarks/bench_metrics.py [--data ../shared/data/LA] [--cases 10] [--repeats 5]

Predictions are the real LA labels dilated, eroded and shifted (a realistic surface mismatch).
Prints the median seconds per volume of each implementation over the repeats, the ratio, and the
largest absolute difference of the values (must be 0 up to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from crln.data.h5 import H5Dataset
from crln.metrics import asd, hd95


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

    def run(fn_asd, fn_hd95) -> tuple[float, list[float]]:
        values, start = [], time.perf_counter()
        for pred, gt in pairs:
            values += [fn_asd(pred, gt), fn_hd95(pred, gt)]
        return (time.perf_counter() - start) / len(pairs), values

    ours, ref = [], []
    for _ in range(args.repeats):  # interleaved so that load changes hit both alike
        t, v_ours = run(asd, hd95)
        ours.append(t)
        t, v_ref = run(binary.asd, binary.hd95)
        ref.append(t)
    diff = max(abs(a - b) for a, b in zip(v_ours, v_ref))
    m_ours, m_ref = statistics.median(ours), statistics.median(ref)
    print(f"cases: {len(pairs)}  repeats: {args.repeats}")
    print(f"medpy asd+hd95: {m_ref:.4f} s/volume   crln: {m_ours:.4f} s/volume   ratio: {m_ref / m_ours:.1f}x")
    print(f"max |difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
