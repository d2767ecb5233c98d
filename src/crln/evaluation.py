"""Evaluate a trained run on a case list, and predict new scans.

Evaluation follows the field's protocol: sliding-window softmax averaging with the configured
patch and stride (18×18×4 on LA), argmax, optional largest-connected-component post-processing,
then Dice, Jaccard, ASD and 95HD per case (:mod:`crln.metrics`, medpy semantics) and a summary
with bootstrapped mean ± std. Distances are in voxels for h5 data (no spacing stored) and in mm
for NIfTI data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crln.atomic import atomic_write_text
from crln.config import RunConfig
from crln.data.case import Case
from crln.data.sources import open_dataset_root
from crln.data.validate import check_channels, validate_case
from crln.engine import distributed
from crln.engine.checkpoint import load_checkpoint
from crln.engine.device import Performance, resolve_device
from crln.engine.run_folder import RunFolder
from crln.engine.trainer import method_from_checkpoint
from crln.errors import CrlnError
from crln.inference import entropy_map, optimize_for_inference, predict_case
from crln.metrics import case_metrics, summarize

__all__ = [
    "EvalResult",
    "eval_dir_name",
    "evaluate",
    "format_summary_table",
    "load_network",
    "per_class_metric_names",
    "predict_files",
]

METRICS = ("dice", "jaccard", "asd", "hd95")


def _resolve_checkpoint(target: str | Path, which: str | None) -> tuple[Path, Path | None]:
    """``target`` is a checkpoint file or a run folder; returns (checkpoint, run folder or None)."""
    path = Path(target)
    if path.is_file():
        return path, (path.parent if (path.parent / "config.yaml").exists() else None)
    if path.is_dir():
        folder = RunFolder(path)
        order = [which] if which else ["final", "latest"]
        for name in order:
            if folder.checkpoint(name).exists():
                return folder.checkpoint(name), path
        raise CrlnError(f"run folder {path}: no checkpoint_{'/'.join(order)}.pt (did training finish?)")
    raise CrlnError(f"{path}: no such run folder or checkpoint file")


def load_network(checkpoint_path: Path, device: torch.device) -> tuple[torch.nn.Module, RunConfig, dict]:
    """The inference network of a checkpoint, in eval mode on ``device`` and prepared by
    :func:`crln.inference.optimize_for_inference` (forward-only), with its config."""
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    try:
        method, config = method_from_checkpoint(state)
    except CrlnError as err:  # a bad config or mismatched weights inside: name the file
        raise CrlnError(f"checkpoint {checkpoint_path}: {err}") from err
    network = optimize_for_inference(method.inference_network().to(device).eval(), device)
    return network, config, {"step": state["step"], "method": state["method"]}


def _check_input(case: Case, config: RunConfig, *, require_label: bool) -> None:
    """Refuse a case the network of ``config`` cannot segment: non-finite voxels, a rank or channel
    count other than ``(H, W, D)`` / ``(model.in_channels, H, W, D)``, labels outside the classes."""
    validate_case(case, num_classes=config.data.num_classes, require_label=require_label, allow_channels=True)
    check_channels(case, config.model.in_channels, " of the checkpoint's network")


def _predict(
    network: torch.nn.Module,
    image: np.ndarray,
    config: RunConfig,
    perf: Performance,
    stride: tuple[int, int, int],
    largest_component: bool,
) -> tuple[np.ndarray, torch.Tensor]:
    """``(label map (H, W, D) uint8, probabilities (C, H, W, D))`` with the run's protocol."""
    return predict_case(
        lambda x: network(perf.input(x)),
        image,
        patch_size=config.data.patch_size,
        stride=stride,
        num_classes=config.data.num_classes,
        sw_batch_size=config.eval.sw_batch_size,
        device=perf.device,
        amp_dtype=perf.amp_dtype,
        largest_component=largest_component,
    )


def eval_dir_name(split: str, checkpoint: str, largest_component: bool, *, default_split: str) -> str:
    """``eval`` for the default evaluation (test list, final checkpoint, no post-processing), else
    ``eval_<split>_<checkpoint>[_lcc]``."""
    if split == default_split and checkpoint == "final" and not largest_component:
        return "eval"
    return f"eval_{split}_{checkpoint}" + ("_lcc" if largest_component else "")


class EvalResult(dict):
    """``{"summary": ..., "per_case": [...], "out_dir": Path}``."""


def evaluate(
    target: str | Path,
    *,
    data_root: str | Path | None = None,
    split: str | None = None,
    checkpoint: str | None = None,
    largest_component: bool | None = None,
    stride: tuple[int, int, int] | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a run folder or checkpoint on a case list and write ``per_case.csv`` + ``summary.json``.

    Args:
        target: run folder (uses ``checkpoint_final.pt`` unless ``checkpoint`` says otherwise) or a
            checkpoint file.
        data_root: dataset folder; default the run's ``data.root``.
        split: case list to evaluate; default the run's ``data.test_split``.
        checkpoint: {``"final"``, ``"best"``, ``"latest"``} when ``target`` is a run folder.
        largest_component: keep only the largest connected component of each foreground class.
        stride: sliding-window stride; default the run's ``eval.stride``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        out_dir: where to write; default ``<run>/eval`` (or ``<run>/eval_<split>_<checkpoint>``
            for a non-default split / checkpoint).
        limit: evaluate only the first N cases of the list (smoke tests).
        progress: print one line per case.

    Raises:
        CrlnError: missing checkpoint, data folder or cases.
    """
    ckpt_path, run_dir = _resolve_checkpoint(target, checkpoint)
    # Under torchrun (crln train --evaluate, or torchrun -m crln evaluate) each process scores a share of the cases.
    dev = distributed.process_device(device)
    distributed.init_from_env(dev)
    network, config, info = load_network(ckpt_path, dev)
    perf = Performance.for_device(dev, config.train.amp, config.train.channels_last)
    if perf.channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    root = data_root if data_root is not None else config.data.root
    split_name = split or config.data.test_split
    lcc = config.eval.largest_component if largest_component is None else largest_component
    stride = tuple(stride) if stride is not None else config.eval.stride
    dataset = open_dataset_root(root, config.data.format if data_root is None else "auto")
    ids = dataset.ids(split_name)[: limit or None]
    if not ids:
        raise CrlnError(f"case list {split_name!r} in {root} is empty")

    scored: list[tuple[int, tuple[dict[str, Any], tuple[float, ...]]]] = []
    for index, case_id in distributed.shard(ids):
        (case,) = dataset.load_many([case_id], with_label=True)
        _check_input(case, config, require_label=True)
        spacing = tuple(float(v) for v in case.spacing)
        start = time.perf_counter()
        pred, _ = _predict(network, case.image, config, perf, stride, lcc)
        seconds = time.perf_counter() - start
        row = {
            "case": case_id,
            **case_metrics(pred, case.label, num_classes=config.data.num_classes, spacing=case.spacing),
            "seconds": seconds,
        }
        scored.append((index, (row, spacing)))
        if progress:
            shown = "  ".join(f"{k}={row[k]:.4f}" for k in METRICS if k in row)
            print(f"[{index + 1}/{len(ids)}] {case_id}  {shown}  ({seconds:.1f} s)", flush=True)

    gathered = distributed.gather_shards(scored)  # every process's rows, in case-list order
    per_case = [row for row, _ in gathered]
    spacings = [spacing for _, spacing in gathered]
    metric_rows = [{k: v for k, v in r.items() if k not in ("case", "seconds")} for r in per_case]
    summary = {
        "metrics": summarize(metric_rows, n_resamples=config.eval.bootstrap_resamples, seed=0),
        "n_cases": len(per_case),
        "split": split_name,
        "data_root": str(root),
        "checkpoint": str(ckpt_path),
        "checkpoint_step": info["step"],
        "method": info["method"],
        "patch_size": list(config.data.patch_size),
        "stride": list(stride),
        "largest_component": lcc,
        "distance_unit": "voxels" if all(s == (1.0, 1.0, 1.0) for s in spacings) else "mm",
        "device": str(dev),
        "seconds_per_case": float(np.mean([r["seconds"] for r in per_case])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if distributed.get_world_size() > 1:
        summary["processes"] = distributed.get_world_size()  # seconds_per_case is then per process
    if out_dir is None:
        base = Path(run_dir) if run_dir is not None else ckpt_path.parent
        which = ckpt_path.stem.replace("checkpoint_", "")
        out_dir = base / eval_dir_name(split_name, which, lcc, default_split=config.data.test_split)
    out_dir = Path(out_dir)
    if distributed.is_main_process():
        _write_per_case(out_dir / "per_case.csv", per_case)
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    distributed.barrier()  # the files exist for every process once evaluate() returns
    return EvalResult(summary=summary, per_case=per_case, out_dir=out_dir)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_per_case(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    fields = list(rows[0].keys())
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def per_class_metric_names(names: Iterable[str]) -> list[str]:
    """The per-class metric names among ``names`` (``dice_1``, ``jaccard_1``, ..., ``hd95_2``, ...),
    grouped by class in :data:`METRICS` order; empty for a binary task."""
    present = set(names)
    split = [name.rpartition("_") for name in present]
    classes = sorted({int(suffix) for base, _, suffix in split if base in METRICS and suffix.isdigit()})
    return [f"{m}_{c}" for c in classes for m in METRICS if f"{m}_{c}" in present]


def format_summary_table(summary: dict[str, Any], title: str = "") -> str:
    """A Markdown table of the summary: metric, mean ± std (bootstrap) and the plain mean ± std.

    With more than one foreground class the plain names are the means over the classes, followed by
    one row per class and metric (``dice_1``, ...).
    """
    lines = [
        f"### {title}" if title else "",
        "| metric | bootstrap mean ± std | mean ± std (cases) | n |",
        "|---|---|---|---|",
    ]
    for name in (*METRICS, *per_class_metric_names(summary["metrics"])):
        stats = summary["metrics"].get(name)
        if stats is None:
            continue
        scale = 100.0 if name.split("_")[0] in ("dice", "jaccard") else 1.0
        unit = "%" if scale == 100.0 else f" {summary.get('distance_unit', 'voxels')}"
        undefined = f" ({stats['n_undefined']} undefined)" if stats.get("n_undefined") else ""
        lines.append(
            f"| {name} | {stats['boot_mean'] * scale:.2f} ± {stats['boot_std'] * scale:.2f}{unit} | "
            f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f} | {stats['n']}{undefined} |"
        )
    return "\n".join(line for line in lines if line)


def _case_id_from_path(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".h5", ".hdf5"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith("_0000"):
        name = name[:-5]
    # The field's h5 layout names every file alike (mri_norm2.h5): the folder is the case.
    if path.suffix in (".h5", ".hdf5") and name in ("mri_norm2", "image", "data"):
        name = path.parent.name
    return name


def _read_input(path: Path) -> Case:
    from crln.data.h5 import read_h5_case
    from crln.data.nifti import read_nifti_volume

    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti_volume(path)
    if path.suffix in (".h5", ".hdf5"):
        return read_h5_case(path, _case_id_from_path(path), with_label=False)
    raise CrlnError(f"input {path}: expected a .nii, .nii.gz or .h5 file")


def predict_files(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    entropy: bool = False,
    largest_component: bool = False,
    device: str = "auto",
    progress: bool = True,
    preview: bool = False,
) -> list[Path]:
    """Segment each input (NIfTI or h5) and write ``<case>_seg.nii.gz`` with the input's affine.

    Optionally also ``<case>_prob.nii.gz`` (``(H, W, D, C)`` softmax), ``<case>_entropy.nii.gz`` and
    ``<case>_overlay.png`` (prediction contours in three planes and the confidence map).
    Returns the segmentation paths.
    """
    from crln.data.nifti import write_nifti

    ckpt_path, _ = _resolve_checkpoint(checkpoint, None)
    dev = resolve_device(device)
    network, config, _ = load_network(ckpt_path, dev)
    perf = Performance.for_device(dev, config.train.amp, config.train.channels_last)
    paths = [Path(p) for p in inputs]
    first_with_id: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise CrlnError(f"input {path}: no such file")
        case_id = _case_id_from_path(path)
        if case_id in first_with_id:
            raise CrlnError(
                f"input {path}: its output {case_id}_seg.nii.gz would overwrite that of {first_with_id[case_id]}; "
                "expected inputs with distinct case names"
            )
        first_with_id[case_id] = path
    out = Path(out_dir)
    written = []
    for path in paths:
        case = _read_input(path)
        _check_input(case, config, require_label=False)
        case_id = _case_id_from_path(path)
        start = time.perf_counter()
        pred, probs = _predict(network, case.image, config, perf, config.eval.stride, largest_component)
        seg_path = out / f"{case_id}_seg.nii.gz"
        write_nifti(seg_path, pred, case.affine)
        if probabilities:
            write_nifti(
                out / f"{case_id}_prob.nii.gz", probs.permute(1, 2, 3, 0).numpy().astype(np.float32), case.affine
            )
        if entropy:
            write_nifti(out / f"{case_id}_entropy.nii.gz", entropy_map(probs).numpy().astype(np.float32), case.affine)
        if preview:
            from crln.report.figures import plot_slice_overlay

            image = case.image if case.image.ndim == 3 else case.image[0]
            plot_slice_overlay(
                image,
                None,
                pred,
                probs.max(0).values.numpy(),
                out / f"{case_id}_overlay.png",
                spacing=case.spacing,
                num_classes=config.data.num_classes,
                title=case_id,
            )
        written.append(seg_path)
        if progress:
            fg = int((pred > 0).sum())
            print(f"{case_id}: {seg_path} ({fg} foreground voxels, {time.perf_counter() - start:.1f} s)", flush=True)
    return written
