"""The built-in demo (``crln demo``): a phantom task where a few labels are not enough, and its plan.

The labelled cases come from one narrow slice of the population (:data:`crln.data.phantom.NARROW`:
mid-sized organs, good contrast, little noise); the unlabelled training cases and the test cases
come from all of it (:data:`crln.data.phantom.WIDE`). Supervised training sees only the slice;
semi-supervised methods also learn from unlabelled scans of the rest, as on real data, where labels
come from few cases and scans from many.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from crln.atomic import atomic_write_text
from crln.config import load_config

__all__ = ["DEMO_METHODS", "DEMO_SEEDS", "demo_fingerprint", "demo_plan", "run_demo", "write_demo_data"]

SHAPE = (64, 64, 40)
DEMO_METHODS = ("supervised", "crln")  # `crln demo`'s rows
DEMO_SEEDS = (1337, 2024, 7)  # the seeds of the multi-seed check (benchmarks/demo_seeds.py)
N_TRAIN, N_TEST = 16, 6  # with the preset's 4 labelled and 2 validation cases: 10 unlabelled
TITLE = "crln demo: synthetic phantoms (never a reported result)"


def _data_spec(n_train: int, n_test: int, labelled: int) -> dict[str, Any]:
    return {"n_train": n_train, "n_test": n_test, "shape": list(SHAPE), "seed": 0, "narrow_first": labelled}


def write_demo_data(root: Path, *, n_train: int, n_test: int, labelled: int) -> None:
    """Write the demo's phantoms unless ``root`` already holds exactly this dataset (``demo_data.json``)."""
    from crln.data.phantom import write_phantom_h5_dataset

    spec = _data_spec(n_train, n_test, labelled)
    stamp = root / "demo_data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return
    # a folder from an older demo or other case counts is replaced, never mixed with new cases
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing the synthetic phantom dataset to {root} ...", flush=True)
    write_phantom_h5_dataset(root, n_train=n_train, n_test=n_test, shape=SHAPE, seed=0, narrow_first=labelled)
    atomic_write_text(stamp, json.dumps(spec) + "\n")


def demo_plan(methods: Sequence[str], overrides: Sequence[str], seeds: Sequence[int] = (1337,)) -> dict[str, Any]:
    """The bench plan of the demo: every method on the demo preset, same data, seeds and evaluation."""
    iterations = load_config("demo", overrides).train.iterations
    runs = []
    for name in methods:
        extra = [f"method.name={name}"]
        if name == "crln":  # start rectifying at 40% of the run, as S = 800 does in a 2000-iteration CPU run
            extra += [f"method.rectify_start={iterations * 2 // 5}", f"method.mu_lr_iterations={iterations}"]
        if name == "bcp":  # pre-train for BCP's share of the run (2,000 of 17,000 iterations), as la_cpu_bcp
            extra += [f"method.pretrain_iterations={max(1, round(iterations * 2 / 17))}"]
        load_config("demo", [*overrides, *extra])  # fail early on a bad method or override
        runs.append({"name": name, "config": "demo", "overrides": extra})
    # The demo's validation cases are few: its last checkpoint is the result, and no val Dice column.
    evaluate = {"checkpoint": "final", "validation": False}
    return {"title": TITLE, "seeds": list(seeds), "overrides": list(overrides), "evaluate": evaluate, "runs": runs}


def run_demo(
    out: Path,
    *,
    methods: Sequence[str],
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1337,),
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    progress: bool = True,
    fresh: bool = True,
) -> Path:
    """Write the data, train and evaluate every (method, seed) in ``out``; returns the table's path.

    ``fresh``: delete earlier runs in ``out`` first (``crln demo``); else finished runs are kept and
    interrupted ones resume, as in ``crln bench``.
    """
    from crln.bench import run_plan

    data_root = out / "data"
    overrides = [f"data.root={data_root}", f"train.output_dir={out / 'runs'}", *overrides]
    plan = demo_plan(methods, overrides, seeds)
    write_demo_data(data_root, n_train=n_train, n_test=n_test, labelled=load_config("demo", overrides).data.labeled)
    if fresh:  # inside the demo's own folder only
        shutil.rmtree(out / "runs", ignore_errors=True)
    plan_path = out / "demo_plan.yaml"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    iterations = load_config("demo", overrides).train.iterations
    print(f"training {', '.join(methods)} for {iterations} iterations each on phantoms ...", flush=True)
    return run_plan(plan_path, progress=progress)


def demo_fingerprint() -> str:
    """A short hash of what decides the demo's accuracy: every run's resolved config, the data set's
    spec and the first phantom of each style, bit for bit.

    ``benchmarks/demo_seeds.py`` records it beside the table it measured; a test compares it with the
    current code's, so a change to the preset, the plan or the phantoms cannot leave the table stale.
    """
    from crln.config import config_to_dict
    from crln.data.phantom import NARROW, WIDE, make_phantom

    overrides = ["data.root=DATA", "train.output_dir=RUNS"]
    plan = demo_plan(DEMO_METHODS, overrides)
    configs = [config_to_dict(load_config("demo", [*overrides, *run["overrides"]])) for run in plan["runs"]]
    labelled = load_config("demo", overrides).data.labeled
    digest = hashlib.sha256(json.dumps([configs, _data_spec(N_TRAIN, N_TEST, labelled)], sort_keys=True).encode())
    for style in (NARROW, WIDE):
        case = make_phantom(0, SHAPE, 2, style)
        digest.update(case.image.tobytes() + case.label.tobytes())
    return digest.hexdigest()[:16]
