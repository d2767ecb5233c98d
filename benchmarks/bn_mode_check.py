"""Does a run lose accuracy to BatchNorm's running statistics? Dice per case, two ways.

Usage: python benchmarks/bn_mode_check.py RUN_DIR [--checkpoint final|best|latest] [--split validation|test]

Scores the run's student on the split's cases with the evaluation's sliding window, twice:
- as evaluated (eval mode: every BatchNorm layer normalises with its running statistics);
- with BatchNorm normalising each batch of windows by its own statistics (dropout stays off), which adapts
  to each case's intensity distribution.
A large gap on some cases says that those cases' features lie far from the statistics gathered in
training (a train / test normalisation mismatch), not that the network cannot segment them. This is a
diagnostic, not an evaluation protocol: the second way uses the test case's own statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crln.data.sources import open_dataset_root  # noqa: E402
from crln.evaluation import case_ids  # noqa: E402
from crln.metrics import mean_foreground_dice  # noqa: E402
from crln.predictor import Predictor  # noqa: E402


def dice_by_bn_mode(run_dir: Path, checkpoint: str = "final", split: str = "validation") -> dict[str, list[float]]:
    """Per-case foreground Dice of the run's student with running and with per-batch BatchNorm statistics.

    Both go through ``Predictor.predict`` (the run's ``data.intensity``, sliding window and argmax) with the
    method's own student swapped in: the predictor's CPU network has its BatchNorm folded into the
    convolutions, so it would have no statistics to switch.
    """
    loaded = Predictor.from_checkpoint(run_dir / f"checkpoint_{checkpoint}.pt", "cpu", with_method=True)
    student = loaded.method.student
    predictor = replace(loaded, network=student)
    norms = [layer for layer in student.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise SystemExit(f"{run_dir}: the student has no BatchNorm layer (model.normalization), nothing to compare")
    config = predictor.config
    dataset = open_dataset_root(config.data.root, config.data.format)
    ids = case_ids(dataset, config, split)
    cases = dataset.load_many(ids, with_label=True)
    scores: dict[str, list[float]] = {"case": list(ids)}
    for mode in ("running", "batch"):
        student.eval()
        for layer in norms if mode == "batch" else []:
            layer.train()
            layer.track_running_stats = False  # normalise by the batch, leave the buffers as trained
        scores[mode] = [
            mean_foreground_dice(predictor.predict(case.image)[0], case.label, config.data.num_classes)
            for case in cases
        ]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="final", choices=["final", "best", "latest"])
    parser.add_argument("--split", default="validation", help="validation (the run's held-out cases) or a case list")
    args = parser.parse_args()
    scores = dice_by_bn_mode(args.run_dir, args.checkpoint, args.split)
    print(f"{args.run_dir} checkpoint_{args.checkpoint}, split {args.split}: Dice % per case")
    print("| case | running statistics (as evaluated) | per-batch statistics |")
    print("|---|---|---|")
    for case, running, batch in zip(scores["case"], scores["running"], scores["batch"], strict=True):
        print(f"| {case} | {100 * running:.1f} | {100 * batch:.1f} |")
    print(f"| mean | {100 * np.mean(scores['running']):.1f} | {100 * np.mean(scores['batch']):.1f} |")
    print(json.dumps({k: v for k, v in scores.items() if k != "case"}))


if __name__ == "__main__":
    main()
