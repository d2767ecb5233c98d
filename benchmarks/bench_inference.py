"""Sliding-window inference of LA test volumes: crln (MONAI, batched windows) against the field's loop.

Usage: python benchmarks/bench_inference.py [--data DIR] [--patch 112 112 80] [--stride 18 18 4]
       [--cases 1] [--repeats 3] [--sw-batch-size 4] [--device cpu|cuda]

The reference is the one-window-at-a-time loop of tests/reference_sliding_window.py (a port of
the field's ``test_single_case``). Both run the same randomly initialised field-standard VNet in
eval mode on the same volumes, interleaved, and the script prints the median seconds per volume,
the ratio, and the largest probability difference (identical predictions are required).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from crln.data.h5 import H5Dataset  # noqa: E402
from crln.inference import sliding_window_predict  # noqa: E402
from crln.models import VNet  # noqa: E402
from reference_sliding_window import reference_sliding_window  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "LA"))
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--stride", type=int, nargs=3, default=[18, 18, 4])
    parser.add_argument("--cases", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = VNet().eval().to(device)
    dataset = H5Dataset(args.data)
    volumes = [dataset.load(cid, with_label=False).image for cid in dataset.ids("test")[: args.cases]]

    def ours(image):
        return sliding_window_predict(
            model,
            image,
            patch_size=args.patch,
            stride=args.stride,
            num_classes=2,
            sw_batch_size=args.sw_batch_size,
            device=device,
        )

    def reference(image):
        return reference_sliding_window(lambda x: model(x.to(device)).cpu(), image, args.patch, args.stride, 2)

    t_ours, t_ref, max_diff, windows = [], [], 0.0, 0
    with torch.inference_mode():
        for _ in range(args.repeats):
            for image in volumes:
                start = time.perf_counter()
                a = ours(image)
                t_ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                b, windows = reference(image)
                t_ref.append(time.perf_counter() - start)
                max_diff = max(max_diff, float((a - torch.from_numpy(b)).abs().max()))
                same = bool(torch.equal(a.argmax(0), torch.from_numpy(b).argmax(0)))
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    print(
        f"volume {tuple(volumes[0].shape)}, patch {args.patch}, stride {args.stride}, {windows} windows, "
        f"device {device}, torch threads {torch.get_num_threads()}"
    )
    print(f"reference loop: {m_ref:.2f} s/volume   crln: {m_ours:.2f} s/volume   ratio: {m_ref / m_ours:.2f}x")
    print(f"max |probability difference|: {max_diff:.2e}   identical argmax: {same}")


if __name__ == "__main__":
    main()
