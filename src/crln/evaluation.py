"""Evaluate a trained run on a case list, and predict new scans.

Evaluation follows the field's protocol: sliding-window softmax averaging with the configured
patch and stride (18×18×4 on LA), argmax, optional largest-connected-component post-processing,
then Dice, Jaccard, ASD and 95HD per case (:mod:`crln.metrics`, medpy semantics) and a summary
with bootstrapped mean ± std. Distances are in the unit of the data's format
(:attr:`crln.data_formats.DataFormat.distance_unit`): voxels for h5 data (no spacing stored), mm for
NIfTI data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crln import metrics
from crln.atomic import atomic_path, check_output_dir
from crln.config import RunConfig, build_config, load_yaml
from crln.data.case import Case
from crln.data.sources import open_dataset_root
from crln.data.splits import plan_split
from crln.data.validate import CHANNEL_STEM_RE, channel_file_name, check_channel_numbers
from crln.data_formats import SCAN_ENDINGS, check_scans, read_scan, scan_format, select_format
from crln.engine import distributed
from crln.engine.run_folder import INFERENCE_WEIGHTS_NAME, RunFolder
from crln.errors import CrlnError
from crln.inference import entropy_map
from crln.metrics import case_metrics, per_class_metric_names, summarize
from crln.predictor import Predictor, check_input, inference_stride, training_preparation
from crln.results import write_per_case, write_summary

__all__ = [
    "VALIDATION_SPLIT",
    "EvalResult",
    "case_ids",
    "checkpoint_candidates",
    "checkpoint_label",
    "eval_dir_name",
    "evaluate",
    "format_summary_table",
    "own_eval_dir",
    "predict_files",
]

# ``split=VALIDATION_SPLIT`` evaluates the cases the run held out of training for validation (the last
# ``data.validation`` ids of its training list, or its ``data.val_split`` list): the split on which settings
# may be chosen, where the test list may not.
VALIDATION_SPLIT = "validation"


def _configured_checkpoint(folder: RunFolder) -> str:
    """The run's ``eval.checkpoint`` from its ``config.yaml`` (``final`` when the folder has none)."""
    if not folder.config_path.is_file():
        return "final"
    try:
        return build_config(load_yaml(folder.config_path)).eval.checkpoint
    except CrlnError as err:
        raise CrlnError(f"{folder.config_path}: cannot read the run's config ({err})") from err


def _resolve_checkpoint(target: str | Path, which: str | None) -> tuple[Path, Path | None]:
    """``target`` is a checkpoint file or a run folder; returns (checkpoint, run folder or None).

    In a run folder the checkpoint is ``which``, else the run's ``eval.checkpoint``, looked for as
    :func:`checkpoint_candidates` says.
    """
    path = Path(target)
    if path.is_file():
        return path, (path.parent if (path.parent / "config.yaml").exists() else None)
    if path.is_dir():
        folder = RunFolder(path)
        candidates = checkpoint_candidates(folder, which or _configured_checkpoint(folder))
        found = next((candidate for candidate in candidates if candidate.exists()), None)
        if found is not None:
            return found, path
        names = [candidate.name for candidate in candidates]
        looked_for = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise CrlnError(f"run folder {path}: no {looked_for} (did training finish?)")
    raise CrlnError(f"{path}: no such run folder or checkpoint file")


def checkpoint_candidates(folder: RunFolder, which: str) -> list[Path]:
    """The files of ``folder`` that stand for its checkpoint ``which``, the first one found to be used.

    ``final`` falls back to ``latest`` (a run stopped early), then to ``model_final.pt``: a run folder
    shared without its resumable checkpoints (``CHECKPOINTS.txt`` calls it the file to share) still
    holds the final network. The other checkpoints stand for themselves.
    """
    if which != "final":
        return [folder.checkpoint(which)]
    return [folder.checkpoint("final"), folder.checkpoint("latest"), folder.inference_weights]


def checkpoint_label(path: Path) -> str:
    """The checkpoint name a file stands for in evaluation folder names: ``final`` for ``checkpoint_final.pt``
    and for ``model_final.pt`` (the same network's weights, the same predictions), ``best`` for
    ``checkpoint_best.pt``, the file's stem for any other file."""
    return "final" if path.name == INFERENCE_WEIGHTS_NAME else path.stem.removeprefix("checkpoint_")


def own_eval_dir(folder: RunFolder, config: RunConfig) -> Path:
    """The folder that ``crln evaluate RUN`` writes with no option: ``eval/``, or e.g. ``eval_test_latest/``
    for a run still training and ``eval_test_final_lcc/`` for one whose ``eval.largest_component`` is set."""
    candidates = checkpoint_candidates(folder, config.eval.checkpoint)
    which = checkpoint_label(next((path for path in candidates if path.exists()), candidates[0]))
    split = config.data.test_split
    return folder.path / eval_dir_name(
        split,
        which,
        config.eval.largest_component,
        default_split=split,
        default_checkpoint=config.eval.checkpoint,
    )


def eval_dir_name(
    split: str,
    checkpoint: str,
    largest_component: bool,
    *,
    default_split: str,
    data_name: str | None = None,
    default_checkpoint: str = "final",
    network: str | None = None,
) -> str:
    """``eval`` for the default evaluation (the run's data, test list, ``eval.checkpoint``, network and no
    post-processing), else ``eval_<split>_<checkpoint>[_<network>][_lcc]``, or with ``eval_<data_name>_``
    in front for another dataset than the run's (``data_name``), so that it never replaces the run's own
    evaluation. ``network`` is given only when it is not the run's ``eval.network``."""
    own = data_name is None and split == default_split and checkpoint == default_checkpoint and network is None
    if own and not largest_component:
        return "eval"
    prefix = f"eval_{data_name}" if data_name is not None else "eval"
    return f"{prefix}_{split}_{checkpoint}" + (f"_{network}" if network else "") + ("_lcc" if largest_component else "")


def _check_sw_batch_size(sw_batch_size: int | None, config: RunConfig) -> int:
    """``--sw-batch-size`` if given (at least 1), else ``eval.sw_batch_size``."""
    if sw_batch_size is None:
        return config.eval.sw_batch_size
    if sw_batch_size < 1:
        raise CrlnError(f"--sw-batch-size: expected at least 1 window per forward pass, got {sw_batch_size}")
    return sw_batch_size


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise CrlnError(f"--limit: expected a positive number of cases, got {limit} (leave it out for all cases)")


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def case_ids(
    dataset: Any, config: RunConfig, split: str, other_data: bool = False, run_dir: Path | None = None
) -> list[str]:
    """The ids of case list ``split``, or for :data:`VALIDATION_SPLIT` the run's own held-out validation cases
    (as ``run_dir``'s ``meta.json`` recorded them, else as its config splits ``dataset``)."""
    if split != VALIDATION_SPLIT:
        return list(dataset.ids(split))
    if other_data:
        raise CrlnError(f"--split {VALIDATION_SPLIT}: the run's held-out cases are in its own data, not in --data")
    # The record, not a new plan: cases added to the folder since training would move the validation ids.
    recorded = RunFolder(run_dir).recorded_split() if run_dir is not None else None
    ids = list(recorded.get("validation", [])) if recorded else plan_split(dataset, config.data)[0].validation
    if not ids:
        raise CrlnError(
            f"--split {VALIDATION_SPLIT}: the run held out no validation cases "
            "(config keys data.validation = 0, data.val_split empty)"
        )
    return ids


def _check_labels_exist(dataset: Any, ids: list[str], split: str) -> None:
    """Every case to score has a label file, where the format tells it without decoding (NIfTI's
    ``label_path``): a missing one is otherwise found only when inference reaches its case.

    Raises:
        CrlnError: naming the first missing label file and how many of the cases lack one.
    """
    label_path = getattr(dataset, "label_path", None)
    missing = [cid for cid in ids if label_path is not None and not label_path(cid).is_file()]
    if missing:
        raise CrlnError(
            f"{label_path(missing[0])}: file not found, expected the label of case {missing[0]!r} "
            f"({len(missing)} of the {len(ids)} cases of {split!r} have none; crln evaluate scores labelled cases, "
            "crln predict segments any)"
        )


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
    sw_batch_size: int | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    network: str | None = None,
) -> EvalResult:
    """Evaluate a run folder or checkpoint on a case list and write ``per_case.csv`` + ``summary.json``.

    Args:
        target: run folder (uses the checkpoint of the run's ``eval.checkpoint``, by default
            ``checkpoint_final.pt``, unless ``checkpoint`` says otherwise; :func:`checkpoint_candidates`) or a
            checkpoint file.
        data_root: dataset folder; default the run's ``data.root``.
        split: case list to evaluate; default the run's ``data.test_split``. ``"validation"``
            (:data:`VALIDATION_SPLIT`): the cases the run held out of training for validation.
        checkpoint: {``"final"``, ``"best"``, ``"latest"``} when ``target`` is a run folder; default the
            run's ``eval.checkpoint``.
        largest_component: keep only the largest connected component of each foreground class.
        stride: sliding-window stride; default the run's ``eval.stride``, scaled when the data's
            scale differs from the training data's (:func:`inference_stride`).
        sw_batch_size: windows per forward pass; default the run's ``eval.sw_batch_size``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        out_dir: where to write; default ``<run>/eval`` (or ``<run>/eval_<split>_<checkpoint>``
            for a non-default split / checkpoint, ``<run>/eval_<data folder name>_<split>_<checkpoint>``
            for another dataset than the run's). Checked before any inference.
        limit: evaluate only the first N cases of the list (smoke tests).
        progress: print one line per case.
        network: evaluate this network (student, teacher, teacher_rectified) of a full checkpoint
            instead of the run's ``eval.network``; the default folder then ends in ``_<network>``.

    Raises:
        CrlnError: missing checkpoint, data folder or cases, an output folder that is a file, bad options.
    """
    _check_limit(limit)
    if out_dir is not None:
        check_output_dir(out_dir, "--out")
    ckpt_path, run_dir = _resolve_checkpoint(target, checkpoint)
    # Under torchrun (crln train --evaluate, or torchrun -m crln evaluate) each process scores a share of the cases.
    dev = distributed.process_device(device, "--device")
    distributed.init_from_env(dev)
    predictor = Predictor.from_checkpoint(ckpt_path, dev, network=network)
    config = predictor.config
    other_network = network if network is not None and network != predictor.run_network else None
    other_data = data_root is not None and not _same_folder(data_root, config.data.root)
    root = data_root if data_root is not None else config.data.root
    split_name = split or config.data.test_split
    lcc = config.eval.largest_component if largest_component is None else largest_component
    stride, stride_note = inference_stride(config, stride, root, run_dir, predictor.training_data)
    windows_per_batch = _check_sw_batch_size(sw_batch_size, config)
    if out_dir is None:
        name = eval_dir_name(
            split_name,
            checkpoint_label(ckpt_path),
            lcc,
            default_split=config.data.test_split,
            data_name=Path(root).name if other_data else None,
            default_checkpoint=config.eval.checkpoint,
            network=other_network,
        )
        out_dir = check_output_dir((Path(run_dir) if run_dir is not None else ckpt_path.parent) / name, "--out")
    out_dir = Path(out_dir)
    data_format = config.data.format if data_root is None else "auto"
    dataset = open_dataset_root(root, data_format)
    ids = case_ids(dataset, config, split_name, other_data, run_dir)[:limit]
    if not ids:
        raise CrlnError(f"case list {split_name!r} in {root} is empty")
    _check_labels_exist(dataset, ids, split_name)
    if progress and stride_note and distributed.is_main_process():
        print(f"note: {stride_note}", flush=True)

    protocol = {"stride": stride, "sw_batch_size": windows_per_batch, "largest_component": lcc}
    per_case = _score_cases(predictor, dataset, ids, protocol, progress)
    source = {"split": split_name, "data_root": str(root), "checkpoint": str(ckpt_path)}
    # the format, not the spacing's values, says whether there is a physical spacing: 1 mm is no voxel unit
    unit = select_format(Path(root), data_format).distance_unit
    summary = _summary(per_case, unit, predictor, protocol, source, str(dev))
    if distributed.is_main_process():
        write_per_case(out_dir / "per_case.csv", per_case)
        write_summary(out_dir / "summary.json", summary)
    distributed.barrier()  # the files exist for every process once evaluate() returns
    return EvalResult(summary=summary, per_case=per_case, out_dir=out_dir)


def _score_cases(
    predictor: Predictor, dataset: Any, ids: list[str], protocol: dict[str, Any], progress: bool
) -> list[dict[str, Any]]:
    """Predict and score every case (this process's share under torchrun); every process gets all rows
    back, in case-list order."""
    config = predictor.config
    scored: list[tuple[int, dict[str, Any]]] = []
    for index, case_id in distributed.shard(ids):
        (case,) = dataset.load_many([case_id], with_label=True)
        check_input(case, config, require_label=True)
        start = time.perf_counter()
        pred, _ = predictor.predict(case.image, **protocol)
        seconds = time.perf_counter() - start
        row = {
            "case": case_id,
            **case_metrics(pred, case.label, num_classes=config.data.num_classes, spacing=case.spacing),
            "seconds": seconds,
        }
        scored.append((index, row))
        if progress:
            shown = "  ".join(f"{m.name}={row[m.name]:.4f}" for m in metrics.METRICS if m.name in row)
            print(f"[{index + 1}/{len(ids)}] {case_id}  {shown}  ({seconds:.1f} s)", flush=True)
    return distributed.gather_shards(scored)


def _summary(
    per_case: list[dict[str, Any]],
    distance_unit: str,
    predictor: Predictor,
    protocol: dict[str, Any],
    source: dict[str, str],
    device: str,
) -> dict[str, Any]:
    """``summary.json``: the bootstrapped metrics, where the cases and weights came from (``source``: split,
    data root, checkpoint file), the network and the sliding-window protocol."""
    config = predictor.config
    metric_rows = [{k: v for k, v in r.items() if k not in ("case", "seconds")} for r in per_case]
    summary = {
        "metrics": summarize(metric_rows, n_resamples=config.eval.bootstrap_resamples, seed=0),
        "n_cases": len(per_case),
        **source,
        "checkpoint_step": predictor.step,
        "method": predictor.method_name,
        "network": config.eval.network,
        "patch_size": list(config.data.patch_size),
        "stride": list(protocol["stride"]),
        "sw_batch_size": protocol["sw_batch_size"],
        "largest_component": protocol["largest_component"],
        "distance_unit": distance_unit,
        "device": device,
        "seconds_per_case": float(np.mean([r["seconds"] for r in per_case])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if distributed.get_world_size() > 1:
        summary["processes"] = distributed.get_world_size()  # seconds_per_case is then per process
    return summary


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
    for name in (*(m.name for m in metrics.METRICS), *per_class_metric_names(summary["metrics"])):
        stats = summary["metrics"].get(name)
        if stats is None:
            continue
        stats = {k: float("nan") if v is None else v for k, v in stats.items()}  # summary.json's null: undefined
        metric = metrics.metric_of(name)[0]
        scale = metric.scale
        unit = metric.unit_text(summary.get("distance_unit", "voxels"))
        unit = unit if unit == metrics.PERCENT else f" {unit}"
        undefined = f" ({stats['n_undefined']} undefined)" if stats.get("n_undefined") else ""
        lines.append(
            f"| {name} | {stats['boot_mean'] * scale:.2f} ± {stats['boot_std'] * scale:.2f}{unit} | "
            f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f} | {stats['n']}{undefined} |"
        )
    return "\n".join(line for line in lines if line)


def _case_id_from_path(path: Path) -> str:
    name = path.name
    for ext in SCAN_ENDINGS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith("_0000"):
        name = name[:-5]
    # The field's h5 layout names every file alike (mri_norm2.h5): the folder is the case.
    if path.suffix in (".h5", ".hdf5") and name in ("mri_norm2", "image", "data"):
        name = path.parent.name
    return name


def _is_scan(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SCAN_ENDINGS) and not path.name.startswith(".")


def _nifti_ending(path: Path) -> str:
    """The NIfTI ending of ``path``'s name: ``.nii.gz``, else ``.nii``."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _case_and_channel(path: Path) -> tuple[str, int | None]:
    """``(case id, k)`` for an nnU-Net channel file ``<case>_000k.nii[.gz]`` whose ``<case>_0000`` is beside
    it, else ``(case id, None)``: a lone ``scan_0003.nii.gz`` is case ``scan_0003``."""
    ending = _nifti_ending(path)
    match = CHANNEL_STEM_RE.match(path.name.removesuffix(ending)) if path.name.endswith(ending) else None
    if match and (path.parent / channel_file_name(match["id"], 0, ending)).is_file():
        return match["id"], int(match["ch"])
    return _case_id_from_path(path), None


def _scan_groups(inputs: list[str | Path]) -> list[tuple[str, list[Path]]]:
    """``(case id, files)`` per case to segment, in input order; a folder stands for the scans in it.

    The nnU-Net channel files of one case in one folder (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``)
    form one multi-channel case.

    Raises:
        CrlnError: a missing input, a folder without scans, a channel missing, or two cases whose
            outputs would have one name.
    """
    groups: dict[str, list[Path]] = {}
    for given in (Path(p) for p in inputs):
        if given.is_dir():
            scans = sorted(p for p in given.iterdir() if _is_scan(p))
            if not scans:
                raise CrlnError(f"input {given}: folder holds no {', '.join(SCAN_ENDINGS)} file")
        elif given.is_file():
            scans = [given]
        else:
            raise CrlnError(f"input {given}: no such file or folder")
        for path in scans:
            case_id, channel = _case_and_channel(path)
            group = groups.setdefault(case_id, [])
            if group and (group[0].parent != path.parent or channel is None or path in group):
                raise CrlnError(
                    f"input {path}: its output {case_id}_seg.nii.gz would overwrite that of {group[0]}; "
                    "expected inputs with distinct case names"
                )
            group.append(path)
    for case_id, paths in groups.items():
        channels = sorted((_case_and_channel(p)[1] or 0, p) for p in paths)
        # the dataset reader's own check and message, so predict and training say the same of a missing file
        check_channel_numbers(paths[0].parent, case_id, channels, _nifti_ending(paths[0]))
        paths[:] = [p for _, p in channels]
    return list(groups.items())


def _raw_scan_preparation(
    predictor: Predictor, run_dir: Path | None, groups: list[tuple[str, list[Path]]]
) -> Callable[[np.ndarray, str], np.ndarray] | None:
    """How raw scans are normalised for this run (:func:`crln.data.prepare_raw.scan_normalizer` of the
    pipeline behind its training data; None: the reader's z-score), checked before any inference.

    Raises:
        CrlnError: raw scans among the inputs of a run whose inputs no raw scan can match (Pancreas-CT).
    """
    from crln.data.prepare_raw import scan_normalizer

    # check_scans has already refused files of no format
    raw = [paths[0] for _, paths in groups if scan_format(paths[0]).raw_scans]  # type: ignore[union-attr]
    if not raw:  # prepared volumes (h5) are read as stored
        return None
    try:
        return scan_normalizer(training_preparation(predictor.config, run_dir, predictor.training_data))
    except CrlnError as err:
        raise CrlnError(f"input {raw[0]}: {err}") from None


def _read_input(paths: list[Path], prepare: Callable[[np.ndarray, str], np.ndarray] | None) -> Case:
    """One case from its file (any format's scan), or from its nnU-Net channel files stacked ``(C, H, W, D)``,
    a raw scan normalised by ``prepare`` when the training data's pipeline asks for it."""
    return read_scan(paths, _case_id_from_path(paths[0]), prepare)


def _output_names(
    case_id: str, *, nnunet_names: bool, probabilities: bool, entropy: bool, preview: bool
) -> dict[str, str]:
    """File names of one case's outputs: ``seg``, and ``prob``, ``entropy``, ``overlay`` when asked for."""
    names = {"seg": f"{case_id}.nii.gz" if nnunet_names else f"{case_id}_seg.nii.gz"}
    wanted = {"prob": probabilities, "entropy": entropy, "overlay": preview}
    endings = {"prob": "_prob.nii.gz", "entropy": "_entropy.nii.gz", "overlay": "_overlay.png"}
    names.update({kind: case_id + endings[kind] for kind, asked in wanted.items() if asked})
    return names


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
    stride: tuple[int, int, int] | None = None,
    sw_batch_size: int | None = None,
    overwrite: bool = False,
    nnunet_names: bool = False,
) -> list[Path]:
    """Segment each input (NIfTI, h5, or every scan of a folder) and write ``<case>_seg.nii.gz``.

    Outputs of a NIfTI scan carry its header (affine, qform/sform codes, units). Optionally also
    ``<case>_prob.nii.gz`` (``(H, W, D, C)`` softmax), ``<case>_entropy.nii.gz`` and ``<case>_overlay.png``
    (prediction contours in three planes and the confidence map). Each case's outputs appear together
    once all of them are made (none when one fails). ``nnunet_names`` names the segmentation
    ``<case>.nii.gz``, as nnU-Net does. The stride follows :func:`inference_stride` (the scans' scale is
    the one recorded in a folder above them, else 1).

    Raises:
        CrlnError: ``out_dir`` is a file, two cases' outputs would have one name, an output already
            exists (without ``overwrite``), bad options, or a bad input. Before any inference every input
            is checked as far as its header tells (NIfTI: readable, 3D or 4D, real numbers, channel files
            agreeing, as many channels as the network takes); what is found only once a case is read (a
            damaged gzip stream, NaN voxels) stops the run there, the cases before it written.

    Returns the segmentation paths.
    """
    out = check_output_dir(out_dir, "-o")
    ckpt_path, run_dir = _resolve_checkpoint(checkpoint, None)
    groups = _scan_groups(inputs)
    names = {
        case_id: _output_names(
            case_id, nnunet_names=nnunet_names, probabilities=probabilities, entropy=entropy, preview=preview
        )
        for case_id, _ in groups
    }
    _check_outputs(out, names, groups, overwrite)
    predictor = Predictor.from_checkpoint(ckpt_path, device)
    config = predictor.config
    check_scans([paths for _, paths in groups], config.model.in_channels)  # headers only, before any inference
    windows_per_batch = _check_sw_batch_size(sw_batch_size, config)
    prepare = _raw_scan_preparation(predictor, run_dir, groups)
    written, notes = [], set()
    for case_id, paths in groups:
        case = _read_input(paths, prepare)
        check_input(case, config, require_label=False)
        case_stride, note = inference_stride(config, stride, paths[0].parent, run_dir, predictor.training_data)
        if progress and note and note not in notes:  # once per folder, not per scan
            notes.add(note)
            print(f"note: {note}", flush=True)
        start = time.perf_counter()
        pred, probs = predictor.predict(
            case.image, stride=case_stride, sw_batch_size=windows_per_batch, largest_component=largest_component
        )
        outputs = {"seg": pred}
        if probabilities:
            outputs["prob"] = probs.permute(1, 2, 3, 0).numpy().astype(np.float32)
        if entropy:
            outputs["entropy"] = entropy_map(probs).numpy().astype(np.float32)
        _write_case_outputs(out, names[case_id], outputs, case, paths[0], (pred, probs, config) if preview else None)
        seg_path = out / names[case_id]["seg"]
        written.append(seg_path)
        if progress:
            fg = int((pred > 0).sum())
            print(f"{case_id}: {seg_path} ({fg} foreground voxels, {time.perf_counter() - start:.1f} s)", flush=True)
    return written


def _check_outputs(
    out: Path, names: dict[str, dict[str, str]], groups: list[tuple[str, list[Path]]], overwrite: bool
) -> None:
    """Refuse outputs that would replace an input scan (always), another case's output (e.g. with nnU-Net
    names, case ``x_prob``'s segmentation and case ``x``'s probabilities) or an existing file (without
    ``overwrite``)."""
    owner: dict[str, str] = {}
    for case_id, case in names.items():
        for name in case.values():
            if owner.setdefault(name, case_id) != case_id:
                raise CrlnError(
                    f"-o {out}: cases {owner[name]!r} and {case_id!r} would both write {name}; "
                    "expected inputs with distinct case names"
                )
    scans = {path.resolve() for _, paths in groups for path in paths}
    clash = next((out / n for case in names.values() for n in case.values() if (out / n).resolve() in scans), None)
    if clash is not None:  # even --overwrite never replaces a scan being segmented
        raise CrlnError(f"-o {out}: output {clash.name} would replace an input scan; choose another folder")
    existing = [out / name for case in names.values() for name in case.values() if (out / name).exists()]
    if existing and not overwrite:
        raise CrlnError(
            f"-o {out}: {existing[0].name} already exists ({len(existing)} output(s) would be replaced); "
            "pass --overwrite to replace them, or choose another folder"
        )


def _write_case_outputs(
    out: Path,
    names: dict[str, str],
    outputs: dict[str, np.ndarray],
    case: Case,
    source: Path,
    preview: tuple[np.ndarray, torch.Tensor, RunConfig] | None,
) -> None:
    """One case's NIfTI outputs (``names[kind]`` for each of ``outputs``), with the header of a NIfTI ``source``,
    and its preview PNG when asked. Every output goes to a temporary file first: a failure (e.g. in the
    preview) leaves none of this case's."""
    from crln.data.nifti import nifti_header, write_nifti

    header = nifti_header(source) if source.name.endswith((".nii", ".nii.gz")) else None
    with contextlib.ExitStack() as stack:
        for kind, array in outputs.items():
            tmp = stack.enter_context(atomic_path(out / names[kind], suffix=".nii.gz"))
            write_nifti(tmp, array, case.affine, header)
        if preview is not None:
            _write_preview(stack, out / names["overlay"], case, *preview)


def _write_preview(
    stack: contextlib.ExitStack, path: Path, case: Case, pred: np.ndarray, probs: torch.Tensor, config: RunConfig
) -> None:
    from crln.report.figures import plot_slice_overlay

    tmp = stack.enter_context(atomic_path(path, suffix=".png"))
    image = case.image if case.image.ndim == 3 else case.image[0]
    plot_slice_overlay(
        image,
        None,
        pred,
        probs.max(0).values.numpy(),
        tmp,
        spacing=case.spacing,
        num_classes=config.data.num_classes,
        title=case.case_id,
    )
