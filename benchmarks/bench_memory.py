"""Peak memory (RSS) of a training step per method and patch, and of sliding-window inference per volume count.

Usage: python benchmarks/bench_memory.py [--what train inference] [--methods supervised mean_teacher crln]
       [--patches 64,64,48 112,112,80] [--batch 2 2] [--steps 2] [--volume 512 512 300] [--volumes 1 3]
       [--infer-patch 96 96 96] [--infer-stride 96 96 96] [--sw-batch-size 4] [--threads 2]
       [--inference-module PATH]

Every measurement runs in a fresh Python process, which reports ``ru_maxrss`` (peak resident set
size) twice, with the heap settings of the ``crln`` commands (:mod:`crln.engine.allocator`; set
``CRLN_CPU_ALLOCATOR=system`` for glibc's): after the imports and the network are built (the
baseline: interpreter, torch, weights) and after the work. The difference is what the work itself needed at its peak.

- ``train``: the engine's step (``Method.train_step``, backward, SGD with momentum,
  ``after_optimizer_step``) of the field's VNet (n_filters 16) on random tensors of each patch, batch
  2 labelled + 2 unlabelled, ``--steps`` steps past CRLN's S (so its teacher DIM and rectification run).
  The training cases the trainer keeps in memory are not included (they are data, listed apart).
- ``inference``: :func:`crln.inference.predict_case` (argmax label map, uint8) of ``--volumes``
  CT-sized float32 volumes one after the other, as ``crln evaluate`` does, with the VNet prepared by
  :func:`crln.inference.optimize_for_inference`. Only the current volume, its probabilities and its
  label map are alive at a time, so the peak must not grow with the number of volumes. The stride
  only changes the number of windows (time), not the memory, so the default is the patch itself.
  ``--inference-module`` loads ``predict_case`` from another file (e.g. an older
  ``src/crln/inference.py`` from git) to compare implementations in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

#: ``ru_maxrss`` is in KiB on Linux.
KIB_PER_MIB = 1024
BENCH_DIR = Path(__file__).resolve().parent


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def _child_train(method_name: str, patch: tuple[int, int, int], batch: list[int], steps: int) -> dict:
    import torch

    sys.path.insert(0, str(BENCH_DIR))
    from bench_step import _batch

    from crln.config import OptimConfig
    from crln.engine.device import Performance
    from crln.engine.trainer import step_extra_optimizers
    from crln.methods import build_method, method_config_class
    from crln.models import VNet

    device = torch.device("cpu")
    perf = Performance.for_device(device)
    torch.manual_seed(0)
    method = perf.place(build_method(method_config_class(method_name)(name=method_name), lambda: VNet(), 2)).train()
    optimizers = method.configure_optimizers(OptimConfig(lr=1e-3, momentum=0.9, weight_decay=0.0))
    data = _batch(patch, batch[0], batch[1] if method.uses_unlabeled else 0, device)
    baseline = _peak_rss_mib()
    start = time.perf_counter()
    for step in range(steps):
        out = method.train_step(data, step + 1000)  # past CRLN's S = 800: the full CRLN step
        optimizers.main.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizers.main.step()
        method.after_optimizer_step(step + 1000)
        step_extra_optimizers(optimizers, step + 1000)
    return {"baseline_mib": baseline, "peak_mib": _peak_rss_mib(), "seconds": time.perf_counter() - start}


def _child_inference(args: argparse.Namespace, volumes: int) -> dict:
    import numpy as np
    import torch

    from crln.inference import optimize_for_inference
    from crln.models import VNet

    if args.inference_module:
        spec = importlib.util.spec_from_file_location("inference_under_test", args.inference_module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        predict_case = module.predict_case
    else:
        from crln.inference import predict_case

    torch.manual_seed(0)
    network = optimize_for_inference(VNet().eval(), "cpu")
    baseline = _peak_rss_mib()
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    foreground = 0
    for _ in range(volumes):
        image = rng.standard_normal(tuple(args.volume), dtype=np.float32)
        label, probs = predict_case(
            network,
            image,
            patch_size=args.infer_patch,
            stride=args.infer_stride,
            num_classes=2,
            sw_batch_size=args.sw_batch_size,
        )
        foreground += int(label.sum())
        del image, label, probs
    return {
        "baseline_mib": baseline,
        "peak_mib": _peak_rss_mib(),
        "seconds": time.perf_counter() - start,
        "foreground": foreground,
    }


def _measure(child_args: list[str], threads: int) -> dict:
    """Run this script as a fresh child process and return its JSON report."""
    command = [sys.executable, __file__, "--threads", str(threads), *child_args]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _patch(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"patch {text!r}: expected three integers like 64,64,48")
    return values  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", nargs="+", choices=["train", "inference"], default=["train", "inference"])
    parser.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "crln"])
    parser.add_argument("--patches", nargs="+", type=_patch, default=[(64, 64, 48), (112, 112, 80)])
    parser.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--volume", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--volumes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--infer-patch", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--infer-stride", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measurement")
    parser.add_argument("--inference-module", default=None, help="file to take predict_case from")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # inside a fresh measurement process
        import torch

        from crln.engine.allocator import tune_cpu_allocator

        torch.set_num_threads(args.threads)
        tune_cpu_allocator()  # the heap settings every `crln` command runs with
        kind, *rest = args.child
        if kind == "train":
            report = _child_train(rest[0], _patch(rest[1]), args.batch, args.steps)
        else:
            report = _child_inference(args, int(rest[0]))
        print(json.dumps(report))
        return

    shared = ["--batch", *map(str, args.batch), "--steps", str(args.steps)]
    shared += ["--volume", *map(str, args.volume), "--infer-patch", *map(str, args.infer_patch)]
    shared += ["--infer-stride", *map(str, args.infer_stride), "--sw-batch-size", str(args.sw_batch_size)]
    if args.inference_module:
        shared += ["--inference-module", args.inference_module]
    print(f"peak RSS per fresh process (MiB); torch threads {args.threads}; baseline = after imports + network")
    if "train" in args.what:
        print(f"training step, batch {args.batch[0]}+{args.batch[1]}, {args.steps} steps, random tensors")
        for patch in args.patches:
            for method in args.methods:
                text = ",".join(map(str, patch))
                r = _measure([*shared, "--child", "train", method, text], args.threads)
                print(
                    f"  {method:14s} patch {text:12s} peak {r['peak_mib']:8.0f}   baseline {r['baseline_mib']:6.0f}"
                    f"   step {r['peak_mib'] - r['baseline_mib']:7.0f}   ({r['seconds'] / args.steps:.1f} s/step)"
                )
    if "inference" in args.what:
        source = args.inference_module or "crln.inference"
        print(
            f"inference, {source}: volume {tuple(args.volume)} float32, patch {tuple(args.infer_patch)}, "
            f"stride {tuple(args.infer_stride)}, sw_batch_size {args.sw_batch_size}"
        )
        for count in args.volumes:
            r = _measure([*shared, "--child", "inference", str(count)], args.threads)
            print(
                f"  {count} volume(s)   peak {r['peak_mib']:8.0f}   baseline {r['baseline_mib']:6.0f}"
                f"   inference {r['peak_mib'] - r['baseline_mib']:7.0f}   ({r['seconds'] / count:.1f} s/volume)"
            )


if __name__ == "__main__":
    main()
