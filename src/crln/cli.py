"""The ``crln`` command line: parse → validate → call one library function per verb.

Exit codes (``crln.errors``): 0 done; 2 a user error (:class:`~crln.errors.CrlnError`, one line);
3 training diverged; 130 / 143 training stopped by SIGINT / SIGTERM with its checkpoint saved.
Configs are loaded and checked before torch is imported, so a typo fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crln import __version__
from crln.engine.allocator import tune_cpu_allocator
from crln.engine.cpu_threads import configure_openmp
from crln.errors import EXIT_DIVERGED, EXIT_USER_ERROR, CrlnError, RunInterrupted, TrainingDiverged

if TYPE_CHECKING:
    from crln.config import RunConfig

__all__ = ["EXIT_DIVERGED", "EXIT_USER_ERROR", "build_parser", "main"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader closed the pipe


def _triple(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 18,18,4, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive integers like 18,18,4, got {text!r}")
    return values  # type: ignore[return-value]


def _add_window_options(p: argparse.ArgumentParser) -> None:
    """``--stride`` and ``--sw-batch-size`` of the verbs that run sliding-window inference."""
    p.add_argument(
        "--stride",
        type=_triple,
        help="sliding-window step per axis, e.g. 18,18,4 (default: the run's eval.stride, scaled by the ratio "
        "of the data's scale to the training data's, see docs/evaluation.md)",
    )
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass (default: the run's eval.sw_batch_size)")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``crln train CONFIG [key=value ...]``."""
    p = sub.add_parser(
        "train",
        help="train a method from a YAML preset with key=value overrides",
        description="Train a method. CONFIG is a YAML file or a preset name shipped with crln "
        "(la, la_cpu, pancreas, brats, demo). Overrides use dotted keys, e.g. "
        "optim.lr=0.01 data.patch_size=[64,64,48] method.name=supervised.",
    )
    p.add_argument("config", help="YAML file or preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint_latest.pt")
    p.add_argument("--run-dir", help="run folder (default runs/<dataset>/<method>__<model>__<tag>/seed<k>)")
    p.add_argument("--evaluate", action="store_true", help="evaluate on the test list after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="stop cleanly before this many seconds have passed: save checkpoint_latest.pt, report the run "
        "as incomplete and exit 0 (continue it with --resume); e.g. one 10-minute GPU session",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from crln.config import load_config

    config = load_config(args.config, args.overrides)  # checked before torch loads (seconds)
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise CrlnError(f"--time-budget-s: expected a positive number of seconds, got {args.time_budget_s}")
    from crln.engine.device import run_settings

    with run_settings(config.train.threads):  # train.threads is the whole command's, --evaluate's too
        return _train_and_evaluate(args, config)


def _train_and_evaluate(args: argparse.Namespace, config: RunConfig) -> int:
    from crln.engine.trainer import train

    result = train(
        config,
        resume=args.resume,
        run_dir=args.run_dir,
        progress=not args.no_progress,
        time_budget_s=args.time_budget_s,
    )
    main_process = _is_main_process()
    if not result.complete:
        if main_process:
            print(
                f"run incomplete: the time budget ({args.time_budget_s:g} s) stopped it after iteration "
                f"{result.steps} of {config.train.iterations}; checkpoint saved in {result.run_dir}; "
                "continue with the same command and --resume"
            )
        return 0
    if main_process:
        print(f"run folder: {result.run_dir}  ({result.steps} iterations, {result.seconds / 60:.1f} min)")
        if result.best_metric is not None:
            print(f"best validation Dice: {result.best_metric:.4f}")
    if args.evaluate:
        return _evaluate_and_print(result.run_dir, None, None, None, None, "auto", None, None)
    if main_process:
        print(f"next: {shlex.join(['crln', 'evaluate', str(result.run_dir)])}")
    return 0


def _is_main_process() -> bool:
    """Under torchrun only rank 0 prints results (every process runs the same command)."""
    from crln.engine.distributed import is_main_process

    return is_main_process()


def _evaluate_and_print(
    target, data, split, checkpoint, lcc, device, out, limit, stride=None, sw_batch_size=None, network=None
) -> int:
    from crln.evaluation import evaluate, format_summary_table

    result = evaluate(
        target,
        data_root=data,
        split=split,
        checkpoint=checkpoint,
        largest_component=lcc,
        device=device,
        out_dir=out,
        limit=limit,
        stride=stride,
        sw_batch_size=sw_batch_size,
        network=network,
    )
    if not _is_main_process():
        return 0
    summary = result["summary"]
    title = (
        f"{summary['method']} — {summary['n_cases']} cases of {summary['split']!r} "
        f"(iteration {summary['checkpoint_step']})"
    )
    print(format_summary_table(summary, title))
    print(f"written: {result['out_dir'] / 'per_case.csv'}, {result['out_dir'] / 'summary.json'}")
    return 0


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """``crln evaluate TARGET``."""
    p = sub.add_parser(
        "evaluate",
        help="sliding-window evaluation: Dice, Jaccard, ASD, 95HD",
        description="Evaluate a run folder or checkpoint on a case list with the field's "
        "sliding-window protocol; writes per_case.csv and summary.json (bootstrapped mean ± std).",
    )
    p.add_argument("target", help="run folder or checkpoint file")
    p.add_argument("--data", help="dataset folder (default: the run's data.root)")
    p.add_argument(
        "--split",
        help="case list to evaluate (default: the run's data.test_split); 'validation': the cases the run held out "
        "of training for validation",
    )
    p.add_argument("--checkpoint", choices=["final", "best", "latest"], help="which checkpoint of a run folder")
    p.add_argument(
        "--network",
        choices=["student", "teacher", "teacher_rectified"],
        help="evaluate this network of the checkpoint instead of the run's eval.network "
        "(output folder eval_<split>_<checkpoint>_<network>)",
    )
    p.add_argument("--largest-component", action="store_true", help="keep the largest connected component")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--out",
        help="output folder (default <run>/eval; <run>/eval_<data folder>_<split>_<checkpoint> with --data OTHER)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N cases (N >= 1)")
    _add_window_options(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return _evaluate_and_print(
        args.target,
        args.data,
        args.split,
        args.checkpoint,
        True if args.largest_component else None,
        args.device,
        args.out,
        args.limit,
        stride=args.stride,
        sw_batch_size=args.sw_batch_size,
        network=args.network,
    )


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """``crln predict CHECKPOINT INPUT ... -o OUT``."""
    p = sub.add_parser(
        "predict",
        help="segment NIfTI or h5 scans (or folders of them) into NIfTI label maps",
        description="Segment each INPUT (.nii, .nii.gz or .h5, or every such scan of a folder; nnU-Net channel "
        "files <case>_0000, <case>_0001 ... of one folder form one case) with a checkpoint (a run folder, a "
        "checkpoint_*.pt or model_final.pt) and write <case>_seg.nii.gz with the input's NIfTI header. "
        "A raw NIfTI scan is normalised as the run's training data was (a `crln data prepare brats` run: "
        "clipped and z-scored over the brain); h5 volumes are used as stored. "
        "Existing outputs are never replaced without --overwrite.",
    )
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="scans or folders of scans to segment")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_prob.nii.gz (H, W, D, C)")
    p.add_argument("--entropy", action="store_true", help="also write <case>_entropy.nii.gz")
    p.add_argument(
        "--preview", action="store_true", help="also write <case>_overlay.png (three planes + confidence map)"
    )
    p.add_argument("--largest-component", action="store_true", help="keep the largest connected component")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in the folder")
    p.add_argument("--nnunet-names", action="store_true", help="name the segmentation <case>.nii.gz (nnU-Net's naming)")
    _add_window_options(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from crln.evaluation import predict_files

    predict_files(
        args.checkpoint,
        args.inputs,
        args.output,
        probabilities=args.probabilities,
        entropy=args.entropy,
        largest_component=args.largest_component,
        device=args.device,
        preview=args.preview,
        stride=args.stride,
        sw_batch_size=args.sw_batch_size,
        overwrite=args.overwrite,
        nnunet_names=args.nnunet_names,
    )
    return 0


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data TOOL``: the dataset tools, each beside its command below."""
    data = sub.add_parser(
        "data", help="dataset tools (prepare, phantom, compact, merge, stats)", description="Dataset tools."
    ).add_subparsers(dest="data_command", metavar="TOOL", required=True)
    _add_prepare_parser(data)
    _add_phantom_parser(data)
    _add_compact_parser(data)
    _add_merge_parser(data)
    _add_stats_parser(data)


# `crln data prepare DATASET` options each dataset takes (argparse dests; unset options are None).
_PREPARE_OPTIONS = {
    "rescale": ("scale", "image_mode", "label_mode"),
    "la": ("split_dir", "seed", "label_grid", "margin", "min_size"),
    "pancreas": ("split_dir", "seed", "label_grid", "margin", "labels", "hu_range", "spacing"),
    "brats": ("split_dir", "seed", "label_grid", "clip_percentile"),
}
_PREPARE_DEFAULT_SCALE = 0.5
# CLI option -> pipeline keyword where the names differ
_PREPARE_KEYWORDS = {"pancreas": {"margin": "margin_mm", "spacing": "spacing_mm"}}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like -125,275, got {text!r}") from None
    return low, high


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data prepare [DATASET] --src SRC --dst DST``."""
    p = sub.add_parser(
        "prepare",
        help="h5 dataset from raw LA / Pancreas-CT / BraTS19 files, or a rescaled h5 copy",
        description="DATASET la, pancreas or brats: the field's preprocessing of the public raw files "
        "(LA 2018 NRRD; Pancreas-CT DICOM + NIfTI labels; BraTS 2019 NIfTI) into the h5 layout with case "
        "lists (docs/datasets.md). DATASET rescale (the default): a resampled copy of an h5 dataset "
        "(same layout, lists copied), e.g. --scale 0.5 makes real LA training fit a 2-core CPU.",
    )
    p.add_argument(
        "dataset",
        nargs="?",
        default="rescale",
        choices=list(_PREPARE_OPTIONS),
        help="what to prepare (default: rescale)",
    )
    p.add_argument("--src", required=True, help="source folder (raw files, or an h5 dataset for rescale)")
    p.add_argument("--dst", required=True, help="destination folder")
    g = p.add_argument_group("rescale")
    g.add_argument("--scale", type=float, help=f"resampling factor per axis (default {_PREPARE_DEFAULT_SCALE})")
    g.add_argument("--image-mode", choices=["area", "trilinear"], help="image resampling (default area)")
    g.add_argument("--label-mode", choices=["majority", "nearest"], help="label resampling (default majority)")
    g = p.add_argument_group("la, pancreas, brats")
    g.add_argument(
        "--split-dir",
        help="folder with the field's case lists (train.list/test.list, or train.txt/val.txt/test.txt for "
        "brats); default: a seeded shuffle cut in the field's proportions",
    )
    g.add_argument("--seed", type=int, help="seed of that shuffle (default 0)")
    g.add_argument(
        "--label-grid",
        choices=["affine", "voxel"],
        help="affine (default): the label file's geometry must place it on the image grid; voxel: the arrays "
        "are already in the same voxel order",
    )
    g.add_argument("--margin", type=float, help="crop margin: voxels in x, y for la (15), mm for pancreas (25)")
    g.add_argument("--min-size", type=int, help="la: smallest crop side in x and y before the margin (112)")
    g.add_argument("--labels", help="pancreas: folder with label<n>.nii.gz (default: searched under --src)")
    g.add_argument("--hu-range", type=_pair, help="pancreas: HU window, written --hu-range=-125,275 (default)")
    g.add_argument("--spacing", type=float, help="pancreas: isotropic output voxel size in mm (1)")
    g.add_argument("--clip-percentile", type=float, help="brats: clip brain intensities at this percentile (99.9)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    allowed = _PREPARE_OPTIONS[args.dataset]
    given = {dest for names in _PREPARE_OPTIONS.values() for dest in names if getattr(args, dest, None) is not None}
    stray = sorted(given - set(allowed))
    if stray:
        raise CrlnError(
            f"{_flag(stray[0])}: not an option of 'crln data prepare {args.dataset}', "
            f"expected only {', '.join(_flag(d) for d in allowed)}"
        )
    if args.dataset == "rescale":
        from crln.data.prepare import prepare_h5_dataset

        scale = _PREPARE_DEFAULT_SCALE if args.scale is None else args.scale
        if not 0 < scale <= 1:
            raise CrlnError(f"--scale: expected a number in (0, 1], got {scale}")
        summary = prepare_h5_dataset(
            args.src,
            args.dst,
            scale=scale,
            image_mode=args.image_mode or "area",
            label_mode=args.label_mode or "majority",
        )
    else:
        from crln.data.prepare_raw import prepare_raw_dataset

        options = {_PREPARE_KEYWORDS.get(args.dataset, {}).get(d, d): getattr(args, d) for d in given}
        if args.dataset == "la" and "margin" in options:
            if not float(options["margin"]).is_integer():
                raise CrlnError(f"--margin: expected a whole number of voxels for la, got {options['margin']}")
            options["margin"] = int(options["margin"])
        summary = prepare_raw_dataset(args.dataset, args.src, args.dst, **options)
    print(f"prepared {args.dst}: {summary}")
    return 0


def _add_phantom_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data phantom --dst DST``."""
    p = sub.add_parser(
        "phantom",
        help="write a synthetic phantom dataset",
        description="Write seeded synthetic phantoms (organ-like blobs) as an h5 or NIfTI dataset. "
        "For demos and tests only, never for reported results.",
    )
    p.add_argument("--dst", required=True, help="destination folder")
    p.add_argument("--format", choices=["h5", "nifti"], default="h5")
    p.add_argument("--train", type=int, default=12, help="training cases")
    p.add_argument("--test", type=int, default=4, help="test cases")
    p.add_argument("--shape", type=_triple, default=(80, 80, 48), help="volume shape H,W,D")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-classes",
        type=int,
        default=2,
        help="classes with background: 2 = one organ; 3 = organ + an inclusion (two structures), train with "
        "data.num_classes=3",
    )
    p.set_defaults(func=_cmd_phantom)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from crln.atomic import check_unshared_output_dir
    from crln.data.phantom import write_phantom_h5_dataset, write_phantom_nifti_dataset

    # Its case lists and dataset.json would replace those of a dataset already there (a real one, say), and
    # a rerun with fewer cases would leave the old case files beside the new.
    check_unshared_output_dir(args.dst, "--dst")
    _check_phantom_flags(args)
    writer = write_phantom_nifti_dataset if args.format == "nifti" else write_phantom_h5_dataset
    root = writer(
        args.dst, n_train=args.train, n_test=args.test, shape=args.shape, seed=args.seed, num_classes=args.num_classes
    )
    print(f"phantom dataset written to {root}")
    return 0


#: The largest phantom volume (512³ voxels): its generation holds several float32 maps of that size at once.
PHANTOM_MAX_VOXELS = 512**3


def _check_phantom_flags(args: argparse.Namespace) -> None:
    """The flags' ranges, named as flags (the writers' own checks name their Python arguments)."""
    if args.seed < 0:  # numpy seeds only non-negative integers, and would fail with a traceback
        raise CrlnError(f"--seed {args.seed}: expected an integer >= 0")
    if args.train < 1 or args.test < 0:
        raise CrlnError(f"--train {args.train} --test {args.test}: expected --train >= 1 and --test >= 0")
    shape = ",".join(map(str, args.shape))
    if min(args.shape) < 8 or math.prod(args.shape) > PHANTOM_MAX_VOXELS:
        raise CrlnError(f"--shape {shape}: expected at least 8 voxels per axis and at most 512³ voxels in all")
    if not 2 <= args.num_classes <= 256:  # the label is uint8: classes 0..255
        raise CrlnError(f"--num-classes {args.num_classes}: expected 2 to 256 for a phantom")


def _add_compact_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data compact --src SRC --dst DST``."""
    p = sub.add_parser(
        "compact",
        help="compact, lossless copy of an h5 dataset (8-bit value tables), optionally in size-capped parts",
        description="Write a compact copy of an h5 dataset: an image with at most 256 distinct float32 "
        "values is stored as uint8 indices into its table of values (bit-exact), larger value sets as "
        "lossless float32; compressed; labels uint8; case lists copied. Restartable (finished cases are "
        "skipped). Training, evaluation and reports read the copy like the h5 folder (data.root=DST).",
    )
    p.add_argument("--src", required=True, help="h5 dataset folder")
    p.add_argument("--dst", required=True, help="destination folder")
    p.add_argument(
        "--codec", choices=["zlib", "lzma"], default="zlib", help="zlib (default, fast loads) or lzma (smaller)"
    )
    p.add_argument(
        "--max-part-mib",
        type=float,
        help="also write DST/part1, part2 ... each at most this many MiB (self-contained; crln data merge joins them)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line per case (bad cases are still reported)")
    p.set_defaults(func=_cmd_compact)


def _cmd_compact(args: argparse.Namespace) -> int:
    from crln.data.compact import compact_h5_dataset

    summary = compact_h5_dataset(
        args.src,
        args.dst,
        codec=args.codec,
        max_part_mib=args.max_part_mib,
        report=None if args.quiet else print,
        report_error=print,  # a bad case is reported even with --quiet
    )
    print(f"compact copy {summary.dst}: {summary}")
    for part in summary.parts:
        print(f"  {part}: {sum(f.stat().st_size for f in part.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
    return 0


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data merge SRC ... --dst DST``."""
    p = sub.add_parser(
        "merge",
        help="merge compact folders (e.g. parts) into one",
        description="Merge compact folders written by crln data compact (e.g. DST/part1, DST/part2) into "
        "one folder; cases already there are kept, the case lists must agree.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="compact folders")
    p.add_argument("--dst", required=True, help="destination folder (created, or extended when it is one already)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from crln.data.compact import merge_compact, read_manifest

    summary = merge_compact(args.sources, args.dst)
    state = "complete" if read_manifest(summary.dst).get("complete") else "incomplete (more parts to merge)"
    print(f"merged into {summary.dst}: {summary.cases} cases ({summary.written} copied now), {state}")
    return 0


def _add_stats_parser(sub: argparse._SubParsersAction) -> None:
    """``crln data stats ROOT``."""
    p = sub.add_parser(
        "stats",
        help="per-case intensity statistics (mean, std, percentiles, foreground contrast)",
        description="Print one Markdown line per case (darkest first) with the intensities the network is fed "
        "(before data.intensity): mean, std, 1st and 99th percentiles, and with a label the foreground share, "
        "foreground and background means and their contrast in std units; then whether the cases are "
        "z-scored one by one.",
    )
    p.add_argument("root", help="dataset folder (h5, compact or NIfTI)")
    p.add_argument("--split", action="append", help="case list to read (repeatable; default: train)")
    p.add_argument("--format", default="auto", help="data.format of the folder (default: detected)")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    from crln.data.sources import open_dataset_root
    from crln.data.stats import case_intensities, format_intensity_table, split_ids

    dataset = open_dataset_root(args.root, args.format)
    ids, unlabelled = split_ids(dataset, args.root, args.split or ["train"])
    print(format_intensity_table(list(case_intensities(dataset, ids, unlabelled))))
    return 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``crln bench PLAN``."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark plan (configs x seeds) into one Markdown table",
        description="Train and evaluate every run x seed of a plan YAML, sequentially and resumably "
        "(finished runs are skipped, interrupted ones resume), and write one Markdown table with "
        "bootstrapped metrics, s/iteration, wall time and the exact commands. A run that diverges is recorded "
        "(diverged.json in its folder) and not trained again; the other runs go on, and the command exits 3.",
    )
    p.add_argument("plan", help="plan YAML (see benchmarks/plans/)")
    p.add_argument("--out", help="Markdown table path (default: the plan path with .md)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument(
        "--seed",
        type=int,
        action="append",
        help="train only this seed of the plan (repeatable), e.g. one seed of every row first; "
        "the table still shows every seed already finished",
    )
    p.add_argument(
        "--row",
        action="append",
        help="train only this row of the plan (repeatable): its number (1 = the first run listed) or part of "
        "its name, e.g. the rows a decision needs first; the table still shows every row already finished",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: evaluate the finished runs (what they lack) and rewrite the table, e.g. beside a "
        "bench still running or after an upgrade",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from crln.bench import run_plan

    only = args.seed or None
    out = run_plan(
        args.plan,
        out=args.out,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        only_seeds=only,
        only_rows=args.row,
        train_missing=not args.no_train,
    )
    if not args.dry_run:
        print(f"table written: {out}")
    return 0


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """``crln report RUN_DIR``."""
    p = sub.add_parser(
        "report",
        help="figures and a self-contained report.html of a run folder",
        description="Write training curves, the evaluation table, slice overlays and 3D renders of the "
        "worst, median and best test cases (and CRLN's pseudo-label rectification) as PNGs and one "
        "self-contained report.html (images embedded). Missing parts become notes.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder")
    p.add_argument("-o", "--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N] for the 3 predictions")
    p.add_argument("--quiet", action="store_true", help="print only the report's path")
    _add_window_options(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from crln.report import build_report

    result = build_report(
        args.run_dir,
        args.out,
        device=args.device,
        progress=not args.quiet,
        stride=args.stride,
        sw_batch_size=args.sw_batch_size,
    )
    print(f"report: {result.html}")
    return 0


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    """``crln config [CONFIG [key=value ...]]``."""
    p = sub.add_parser(
        "config",
        help="list the presets, or print a resolved config",
        description="Print a preset or YAML file with overrides applied and every default filled in; "
        "with no argument, list the presets.",
    )
    p.add_argument("config", nargs="?", help="YAML file or preset name (none: list the presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from crln.config import config_to_dict, load_config, preset_summaries

    if args.config is None:
        summaries = preset_summaries()
        width = max(len(name) for name, _ in summaries)
        print("\n".join(f"{name:<{width}}  {comment}" for name, comment in summaries))
        return 0
    if "=" in args.config and not Path(args.config).is_file():
        raise CrlnError(
            f"config: {args.config!r} is an override; name a preset or YAML file first: crln config PRESET key=value"
        )
    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``crln demo``."""
    p = sub.add_parser(
        "demo",
        help="train and evaluate on built-in synthetic data",
        description="Write a small synthetic phantom dataset, train each method on it with the same "
        "engine, seed and split, evaluate, and print one comparison table.",
    )
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--iterations", type=int, help="training iterations per method (default: the demo preset's)")
    p.add_argument(
        "--methods",
        type=lambda text: [m for m in text.split(",") if m],
        default=["supervised", "crln"],
        help="comma-separated methods to compare (default: supervised,crln)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML report of each run")
    p.add_argument("--train-cases", type=int, default=16)
    p.add_argument("--test-cases", type=int, default=6)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from crln.demo import run_demo

    out = Path(args.out)
    overrides = [*args.overrides, *([f"train.iterations={args.iterations}"] if args.iterations else [])]
    table = run_demo(
        out,
        methods=args.methods,
        overrides=overrides,
        n_train=args.train_cases,
        n_test=args.test_cases,
        progress=not args.no_progress,
    )
    print(_terminal_text(table))
    if not args.no_report:
        from crln.report import build_report

        for run_dir in sorted((out / "runs").glob("*/*/seed*")):
            print(f"report: {build_report(run_dir, progress=False).html}")
    print(f"run folders: {out / 'runs'}; table: {table}")
    return 0


_MARKDOWN_IMAGE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<file>[^)]+)\)$")


def _terminal_text(table: Path) -> str:
    """A Markdown table file for a terminal: each image line becomes ``figure: caption: path``."""
    lines = []
    for line in table.read_text().splitlines():
        image = _MARKDOWN_IMAGE.match(line.strip())
        lines.append(f"figure: {image['caption']}: {table.parent / image['file']}" if image else line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``crln`` argument parser: one sub-command per verb, each built by ``_add_<verb>_parser`` beside its
    ``_cmd_<verb>``, in the order ``crln --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="crln",
        description="Semi-supervised 3D medical image segmentation: CRLN and baselines in one engine.",
    )
    parser.add_argument("--version", action="version", version=f"crln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_data_parser(sub)
    _add_bench_parser(sub)
    _add_report_parser(sub)
    _add_config_parser(sub)
    _add_demo_parser(sub)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command's namespace its own parser, so that its errors show its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(command_parser=sub)
                _remember_parsers(sub)


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, taking ``key=value`` overrides anywhere (also after options such as ``--resume``)."""
    parser = build_parser()
    _remember_parsers(parser)
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    stray = [arg for arg in extra if not (takes_overrides and _is_override(arg))]
    if stray:
        args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if takes_overrides:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crln`` console script."""
    configure_openmp()  # before torch loads: idle OpenMP threads must not spin away a shared CPU
    args = parse_args(argv)
    tune_cpu_allocator()  # see crln.engine.allocator: a third of a CPU step was kernel page faults
    try:
        return int(args.func(args) or 0)
    except CrlnError as err:
        # One line whatever the message holds (e.g. a multi-line reason from a library).
        print(f"crln: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USER_ERROR
    except RunInterrupted as stop:  # not an error: the checkpoint is saved and --resume continues
        print(f"crln: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("crln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `crln bench PLAN --dry-run | head`: the reader left, nothing went wrong here
        with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout to devnull: no flush error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        # Leave the torchrun process group that train / evaluate joined (only loaded when one was needed).
        distributed = sys.modules.get("crln.engine.distributed")
        if distributed is not None:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
