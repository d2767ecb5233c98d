"""``crln report``: one run folder → PNG figures and a self-contained ``report.html``.

What the report holds, each part only when its inputs exist (a missing part becomes a note):

- run facts from ``config.yaml`` and ``meta.json``;
- training curves from ``log.jsonl``;
- the evaluation from ``eval/per_case.csv`` + ``eval/summary.json``: bootstrapped summary and the
  per-case table sorted worst first;
- for the worst, median and best test cases (by Dice): slice overlays and a 3D surface render
  (needs a checkpoint and the dataset; 3 sliding-window predictions, nothing else);
- for a method that rectifies pseudo-labels (CRLN, :meth:`crln.methods.Method.rectification_views`): the
  rectification of one patch (teacher pseudo-label, M(x), rectified).

What a method adds (facts, timeline marks such as CRLN's S) comes from its own hooks
(:meth:`crln.methods.Method.report_facts`, :meth:`~crln.methods.Method.timeline_marks`); metrics and their
labels come from :data:`crln.metrics.METRICS`.
"""

from __future__ import annotations

import csv
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from crln import metrics
from crln.atomic import atomic_write_text, check_output_dir
from crln.data.transforms import normalize_intensity
from crln.engine.run_folder import RunFolder, read_log
from crln.errors import CrlnError
from crln.metrics import mean_foreground_dice, per_class_metric_names
from crln.report import figures
from crln.report.page import Section, render_page, table
from crln.results import read_per_case

if TYPE_CHECKING:
    from crln.predictor import Predictor

__all__ = ["ReportResult", "build_report"]


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    html: Path
    figures: dict[str, figures.SavedFigure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Output:
    """Where the report goes while it is built: its folder, the result it fills and the progress lines."""

    folder: Path
    result: ReportResult
    progress: bool

    def say(self, message: str) -> None:
        if self.progress:
            print(f"report: {message}", flush=True)

    def missing(self, section: Section, message: str) -> None:
        """A part that could not be made: noted in ``section`` and in the report's Notes."""
        self.result.notes.append(message)
        section.note(message)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value * scale:.{digits}f}"


def _choose_cases(per_case: list[dict[str, Any]]) -> list[tuple[str, str, float | None]]:
    """(role, case id, Dice) for the worst, median and best cases (distinct, worst first)."""
    ranked = sorted((r for r in per_case if np.isfinite(r.get("dice", float("nan")))), key=lambda r: r["dice"])
    if not ranked:
        return []
    picks = [("worst", ranked[0]), ("median", ranked[(len(ranked) - 1) // 2]), ("best", ranked[-1])]
    seen, out = set(), []
    for role, row in picks:
        if row["case"] not in seen:
            seen.add(row["case"])
            out.append((role, row["case"], row["dice"]))
    return out


def _class_of(name: str) -> tuple[str, str]:
    """``("dice", "2")`` for ``dice_2``."""
    base, _, cls = name.rpartition("_")
    return base, cls


def _crop(volume: np.ndarray, centre: tuple[int, int, int], size: tuple[int, ...]) -> np.ndarray:
    """A ``size`` patch of ``volume`` ``(..., H, W, D)`` centred at ``centre``, zero-padded where the volume is
    smaller; leading (channel) axes are kept."""
    spatial = volume.shape[-3:]
    pads = [(max(0, s - d), 0) for s, d in zip(size, spatial)]
    pads = [(p // 2, p - p // 2) for p, _ in pads]
    padded = np.pad(volume, [(0, 0)] * (volume.ndim - 3) + pads)
    starts = []
    for c, s, d, (before, _) in zip(centre, size, padded.shape[-3:], pads):
        starts.append(int(min(max(c + before - s // 2, 0), d - s)))
    x, y, z = starts
    return padded[..., x : x + size[0], y : y + size[1], z : z + size[2]]


def _first_channel(image: np.ndarray) -> np.ndarray:
    """The channel the figures show: ``(H, W, D)`` as is, channel 0 of ``(C, H, W, D)``."""
    return image if image.ndim == 3 else image[0]


def _summary_rows(stats_by_name: dict[str, Any], unit: str) -> list[list[str]]:
    """Rows (metric, bootstrap mean ± std, mean ± std, n) of a summary, in :data:`crln.metrics.METRICS`
    order, then per class."""
    class_names = per_class_metric_names(stats_by_name)
    rows = []
    for name in (*(m.name for m in metrics.METRICS), *class_names):
        stats = stats_by_name.get(name)
        found = metrics.metric_of(name)
        if not stats or found is None:
            continue
        metric, cls = found
        if cls:
            label = f"{metric.label} class {cls}"
        elif class_names:
            label = f"{metric.label} (mean over classes)"
        else:
            label = metric.label
        scale = metric.scale
        rows.append(
            [
                f"{label} {metric.unit_text(unit)}",
                f"{_fmt(stats.get('boot_mean'), scale)} ± {_fmt(stats.get('boot_std'), scale)}",
                f"{_fmt(stats.get('mean'), scale)} ± {_fmt(stats.get('std'), scale)}",
                str(stats.get("n", "")),
            ]
        )
    return rows


def _per_case_table(per_case: list[dict[str, Any]], unit: str) -> str:
    """The per-case table, worst Dice first: every metric, then (several foreground classes) Dice per class."""
    ranked = sorted(per_case, key=lambda r: np.nan_to_num(r.get("dice", np.nan), nan=-1.0))
    class_dice = [n for n in per_class_metric_names(per_case[0]) if n.startswith("dice_")]
    columns = metrics.METRICS
    headers = [
        f"{m.label} %" + (" (mean)" if class_dice and m.name == "dice" else "")
        if m.unit == metrics.PERCENT
        else f"{m.label} ({unit})"
        for m in columns
    ]
    return table(
        ["case", *headers, *(f"Dice class {_class_of(n)[1]} %" for n in class_dice), "seconds"],
        [
            [
                r["case"],
                *(_fmt(r.get(m.name), m.scale) for m in columns),
                *(_fmt(r.get(n), 100) for n in class_dice),
                _fmt(r.get("seconds")),
            ]
            for r in ranked
        ],
        row_classes=["worst" if i == 0 else "" for i in range(len(ranked))],
    )


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
    stride: tuple[int, int, int] | None = None,
    sw_batch_size: int | None = None,
) -> ReportResult:
    """Write the report of a run folder (figures + ``report.html``) into ``out_dir`` (default ``<run>/report``).

    Missing parts (no log, no evaluation, no checkpoint, dataset not found) become notes in the
    report. ``stride`` and ``sw_batch_size`` set the 3 case predictions' sliding window (default as
    :func:`crln.predictor.inference_stride` and ``eval.sw_batch_size``). Raises :class:`CrlnError`
    when ``run_dir`` is not a run folder, ``out_dir`` is a file, or an option is out of range.
    """
    from crln.engine.device import resolve_device
    from crln.evaluation import own_eval_dir
    from crln.methods import method_class

    start = time.perf_counter()
    if out_dir is not None:
        check_output_dir(out_dir, "-o")
    run, config = _open_run(run_dir)
    out = check_output_dir(out_dir if out_dir is not None else run.path / "report", "-o")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise CrlnError(f"--sw-batch-size: expected at least 1 window per forward pass, got {sw_batch_size}")
    dev = resolve_device(device, "--device")
    if stride is not None:
        from crln.predictor import inference_stride

        inference_stride(config, stride, config.data.root, run.path)  # refuse a bad --stride before any work
    out.mkdir(parents=True, exist_ok=True)
    output = _Output(out, ReportResult(html=out / "report.html"), progress)
    result = output.result
    records = read_log(run.log_path)
    method_cls = method_class(config.method.name)
    marks = method_cls.timeline_marks(config.method)
    facts = _facts_section(run, config, records, method_cls)
    curves = _curves_section(records, marks, config.method.name, output)
    evaluation, per_case, summary = _evaluation_section(run, own_eval_dir(run, config), output)
    cases = _case_sections(run, config, per_case, summary, dev, (stride, sw_batch_size), output)
    sections = [facts, curves, evaluation, *cases]
    if result.notes:
        missing = Section("Notes")
        for note in result.notes:
            missing.note(note)
        sections.insert(1, missing)
    last_step = max((r.get("step", 0) for r in records), default=0)
    title = f"crln report: {config.method.name} on {config.data.name}"
    subtitle = f"{run.path} · iteration {last_step} · written {time.strftime('%Y-%m-%d %H:%M:%S')}"
    atomic_write_text(result.html, render_page(title, subtitle, sections))
    result.seconds = time.perf_counter() - start
    output.say(f"written {result.html} ({result.seconds:.1f} s)")
    return result


def _open_run(run_dir: str | Path) -> tuple[RunFolder, Any]:
    """The run folder and its config; :class:`CrlnError` when it is not a run folder of ``crln train``."""
    from crln.config import build_config

    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise CrlnError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise CrlnError(f"{run.path}: not a run folder (no config.yaml; expected a folder written by crln train)")
    try:
        return run, build_config(yaml.safe_load(run.config_path.read_text()) or {})
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise CrlnError(f"{run.config_path}: cannot read the run's config ({err})") from err


def _facts_section(run: RunFolder, config: Any, records: list[dict[str, Any]], method_cls: Any) -> Section:
    """What ran: method, data, budget, speed, best validation Dice, the method's own facts, provenance."""
    meta = _read_json(run.path / "meta.json") or {}
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_dice" in r]
    facts = Section("Run")
    last_step = max((r.get("step", 0) for r in records), default=0)
    spi = [r["seconds_per_iteration"] for r in train_records if "seconds_per_iteration" in r]
    fact_rows = [
        ["run folder", str(run.path)],
        ["method / model", f"{config.method.name} / {config.model.name} (n_filters={config.model.n_filters})"],
        ["dataset", f"{config.data.name} ({config.data.root}), {config.data.labeled} labelled cases"],
        ["iterations logged", f"{last_step} of {config.train.iterations}"],
        ["patch / batch", f"{list(config.data.patch_size)} / {config.data.labeled_batch_size}"],
    ]
    if spi:
        fact_rows.append(["seconds per iteration (median)", f"{float(np.median(spi)):.3f}"])
    if val_records:
        best = max(val_records, key=lambda r: r["val_dice"])
        fact_rows.append(["best validation Dice", f"{100 * best['val_dice']:.2f}% at iteration {best['step']}"])
    fact_rows += [[fact, value] for fact, value in method_cls.report_facts(config.method)]
    for key in ("git_commit", "torch_version", "host", "cuda_device", "started", "command"):
        if meta.get(key):
            fact_rows.append([key.replace("_", " "), str(meta[key])])
    facts.html(table(["", ""], fact_rows, cls="facts"))
    facts.html(
        "<details><summary>resolved config.yaml</summary><pre>"
        + html.escape(run.config_path.read_text())
        + "</pre></details>"
    )
    return facts


def _curves_section(
    records: list[dict[str, Any]],
    marks: tuple[Any, ...],
    method_name: str,
    output: _Output,
) -> Section:
    """The training curves of ``log.jsonl``, with the method's timeline marks (CRLN's S) as dashed lines."""
    curves = Section("Training curves")
    if not records:
        output.result.notes.append("no log.jsonl records: no training curves")
        curves.note("log.jsonl is missing or empty: no training curves.")
        return curves
    fig = figures.plot_training_curves(
        records, output.folder / "curves.png", marks=marks, title=f"{method_name}: training log"
    )
    if fig is None:
        curves.note("log.jsonl holds no plottable scalars.")
    else:
        output.result.figures["curves"] = fig
        curves.image(fig.path, "training curves", fig.width, fig.height)
        if marks:
            shown = "; ".join(mark.description for mark in marks)
            curves.html(f'<p class="muted">dashed line{"s" if len(marks) > 1 else ""}: {shown}.</p>')
    output.say("training curves")
    return curves


def _evaluation_section(
    run: RunFolder, eval_dir: Path, output: _Output
) -> tuple[Section, list[dict[str, Any]], dict[str, Any] | None]:
    """The run's evaluation in ``eval_dir`` (summary and per-case tables), with the per-case rows and the
    summary it read."""
    evaluation = Section("Evaluation")
    per_case_path, summary_path = eval_dir / "per_case.csv", eval_dir / "summary.json"
    per_case: list[dict[str, Any]] = []
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if per_case_path.is_file():
        try:
            per_case = read_per_case(per_case_path)
        except (OSError, csv.Error) as err:
            output.result.notes.append(f"cannot read {per_case_path}: {err}")
    if not per_case:
        message = f"no evaluation yet ({per_case_path} missing): run `crln evaluate {run.path}`"
        output.result.notes.append(message)
        evaluation.note(message + ", then `crln report` again.")
        return evaluation, per_case, summary
    unit = (summary or {}).get("distance_unit", "voxels")
    if summary and summary.get("metrics"):
        rows = _summary_rows(summary["metrics"], unit)
        evaluation.html(table(["metric", "bootstrap mean ± std", "mean ± std (cases)", "n"], rows))
        evaluation.html(f'<p class="muted">{html.escape(_evaluation_line(summary))}</p>')
    else:
        evaluation.note(f"{summary_path} missing or unreadable: per-case table only.")
    evaluation.heading("Per case, worst first")
    evaluation.html(_per_case_table(per_case, unit))
    output.say("evaluation tables")
    return evaluation, per_case, summary


def _evaluation_line(summary: dict[str, Any]) -> str:
    """What the summary scored: cases, split, checkpoint, network (``eval.network``: one checkpoint holds several,
    e.g. CRLN's student and rectified teacher) and the sliding-window protocol."""
    network = summary.get("network")  # absent from summaries written before it was recorded
    return (
        f"{summary.get('n_cases')} cases of split {summary.get('split')!r}, checkpoint "
        f"{Path(str(summary.get('checkpoint', ''))).name} (iteration {summary.get('checkpoint_step')}), "
        + (f"network {network}, " if network else "")
        + f"patch {summary.get('patch_size')}, stride {summary.get('stride')}, "
        f"largest component {summary.get('largest_component')}, {summary.get('date', '')}"
    )


def _case_sections(
    run: RunFolder,
    config: Any,
    per_case: list[dict[str, Any]],
    summary: dict[str, Any] | None,
    device: torch.device,
    window: tuple[tuple[int, int, int] | None, int | None],
    output: _Output,
) -> list[Section]:
    """Slices and surfaces of 3 test cases, then the rectification figure when the method has one."""
    from crln.evaluation import checkpoint_candidates

    cases_section = Section("Test cases: slices and surfaces")
    # The run's evaluated checkpoint (eval.checkpoint) first, so that the figures show what the tables score;
    # crln evaluate's own fallbacks next, so a folder shared with model_final.pt alone still shows its cases.
    own = checkpoint_candidates(run, config.eval.checkpoint)
    paths = dict.fromkeys((*own, *checkpoint_candidates(run, "final"), run.checkpoint("best")))
    checkpoint_path = next((path for path in paths if path.is_file()), None)
    if checkpoint_path is None:
        output.missing(
            cases_section, "no checkpoint in the run folder: no slice overlays, renders or rectification figure"
        )
        return [cases_section]
    shown = _case_figures(run, checkpoint_path, per_case, summary, device, window, cases_section, output)
    if shown is None:
        return [cases_section]
    if shown[0].method is None:  # model_final.pt: the inference network alone, without the method's other parts
        if _rectifies(config.method.name):
            output.missing(
                cases_section,
                f"{checkpoint_path.name} holds the inference network only: no rectification figure "
                "(it needs a full checkpoint_*.pt)",
            )
        return [cases_section]
    rectification = _rectification_section(*shown, output)
    return [cases_section] if rectification is None else [cases_section, rectification]


def _rectifies(method_name: str) -> bool:
    """Whether the method draws a rectification figure (overrides :meth:`crln.methods.Method.rectification_views`)."""
    from crln.methods import Method, method_class

    return method_class(method_name).rectification_views is not Method.rectification_views


def _case_figures(
    run: RunFolder,
    checkpoint_path: Path,
    per_case: list[dict[str, Any]],
    summary: dict[str, Any] | None,
    device: torch.device,
    window: tuple[tuple[int, int, int] | None, int | None],
    section: Section,
    output: _Output,
) -> tuple[Predictor, Any] | None:
    """Overlays and renders of the worst, median and best cases; returns the predictor and the case the
    rectification figure shows (the median), or None when nothing could be predicted."""
    from crln.predictor import Predictor, inference_stride

    try:
        # The rectification figure needs the whole method, which only a full checkpoint holds.
        full = checkpoint_path != run.inference_weights
        predictor = Predictor.from_checkpoint(checkpoint_path, device, with_method=full)
    except (CrlnError, OSError, RuntimeError, KeyError) as err:
        output.missing(section, f"cannot load {checkpoint_path.name}: {err}")
        return None
    ckpt_config = predictor.config
    evaluated = (summary or {}).get("checkpoint_step")
    if evaluated is not None and evaluated != predictor.step:  # a run still training, evaluated a while ago
        output.missing(
            section,
            f"the evaluation scored iteration {evaluated}, these figures show {checkpoint_path.name} at iteration "
            f"{predictor.step} (the Dice in their titles is the evaluation's): run `crln evaluate {run.path}` "
            "again to score it",
        )
    root = Path(str((summary or {}).get("data_root") or ckpt_config.data.root))
    loaded = _shown_cases(root, ckpt_config, per_case, summary, section, output)
    if loaded is None:
        return None
    chosen, cases = loaded
    stride, stride_note = inference_stride(ckpt_config, window[0], root, run.path)
    if stride_note:
        output.say(stride_note)
        section.note(f"Sliding window: {stride_note}.")
    unit = (summary or {}).get("distance_unit") or (
        "voxels" if all(tuple(c.spacing) == (1.0, 1.0, 1.0) for c in cases) else "mm"
    )
    section.html(
        f'<p class="muted">checkpoint {checkpoint_path.name} (iteration {predictor.step}); green: ground truth, '
        "magenta dashed: prediction; confidence = max softmax probability.</p>"
    )
    protocol = {"stride": stride, "sw_batch_size": window[1] or ckpt_config.eval.sw_batch_size}
    for shown, case in zip(chosen, cases):
        _one_case_figures(predictor, shown, case, protocol, unit, section, output)
    median = next((case for (role, _, _), case in zip(chosen, cases) if role == "median"), cases[0])
    return predictor, median


def _shown_cases(
    root: Path,
    config: Any,
    per_case: list[dict[str, Any]],
    summary: dict[str, Any] | None,
    section: Section,
    output: _Output,
) -> tuple[list[tuple[str, str, float | None]], list[Any]] | None:
    """The worst, median and best evaluated cases ``(role, case id, Dice)`` and the cases themselves (the first
    test case when there is no evaluation); None, with a note, when the dataset cannot be read or is empty."""
    from crln.data.sources import open_dataset_root

    try:
        dataset = open_dataset_root(root, config.data.format)
        chosen = _choose_cases(per_case)
        if not chosen:
            first = dataset.ids((summary or {}).get("split") or config.data.test_split)[:1]
            chosen = [("first test case", first[0], None)] if first else []
            if chosen:
                section.note("No evaluation yet: showing the first test case instead of the worst, median and best.")
        cases = dataset.load_many([c[1] for c in chosen], with_label=True) if chosen else []
    except (CrlnError, OSError, ValueError, KeyError) as err:
        output.missing(section, f"dataset {root} not readable ({err}): no slice overlays or renders")
        return None
    if not cases:
        section.note(f"no test cases found in {root}.")
        return None
    return chosen, cases


def _one_case_figures(
    predictor: Predictor,
    shown: tuple[str, str, float | None],
    case: Any,
    protocol: dict[str, Any],
    unit: str,
    section: Section,
    output: _Output,
) -> None:
    """Predict one case and add its slice overlay and surface render to ``section``."""
    from crln.inference import window_count

    role, case_id, dice_value = shown
    config = predictor.config
    num_classes = config.data.num_classes
    t0 = time.perf_counter()
    windows = window_count(case.shape, config.data.patch_size, protocol["stride"])
    output.say(f"predicting {case_id} ({role}): {windows} windows, stride {list(protocol['stride'])} ...")
    pred, probs = predictor.predict(case.image, **protocol)
    confidence = probs.max(0).values.numpy()
    label = case.label
    dice_now = mean_foreground_dice(pred, label, num_classes) if label is not None else None
    dice = dice_value if dice_value is not None else dice_now
    heading = f"{role}: {case_id}" + (f" (Dice {100 * dice:.2f}%)" if dice is not None else "")
    safe = role.replace(" ", "_")
    overlay = figures.plot_slice_overlay(
        _first_channel(case.image),
        label,
        pred,
        confidence,
        output.folder / f"overlay_{safe}.png",
        spacing=case.spacing,
        num_classes=num_classes,
        title=heading,
    )
    render = figures.plot_surface_render(
        label, pred, output.folder / f"render_{safe}.png", spacing=case.spacing, distance_unit=unit, title=heading
    )
    output.result.figures[f"overlay_{safe}"] = overlay
    output.result.figures[f"render_{safe}"] = render
    section.heading(heading)
    section.image(overlay.path, f"slice overlay of {case_id}", overlay.width, overlay.height)
    section.image(render.path, f"3D surface render of {case_id}", render.width, render.height)
    output.say(f"{role} case {case_id} ({time.perf_counter() - t0:.1f} s)")


def _rectification_section(predictor: Predictor, case: Any, output: _Output) -> Section | None:
    """The method's pseudo-label rectification on one patch of ``case`` around its object
    (:meth:`crln.methods.Method.rectification_views`); None for a method that does not rectify."""
    assert predictor.method is not None
    size = tuple(int(s) for s in predictor.config.data.patch_size)
    centre = figures.object_centre(case.label > 0 if case.label is not None else None, shape=case.shape)
    # the network's input contract (data.intensity) holds for the whole volume, so normalise before cropping
    image_patch = _crop(normalize_intensity(case.image, predictor.config.data.intensity), centre, size)
    label_patch = _crop(case.label, centre, size) if case.label is not None else None
    patch = torch.from_numpy(np.ascontiguousarray(image_patch, dtype=np.float32))
    patch = (patch[None] if patch.ndim == 4 else patch[None, None]).to(predictor.device)  # (1, C, h, w, d)
    views = predictor.method.rectification_views(patch)
    if views is None:
        return None
    section = Section(f"{predictor.method_name.upper()} pseudo-label rectification")
    step, arrays = predictor.step, {"teacher": views.teacher, "m": views.m, "rectified": views.rectified}
    weight = f", μ = {views.weight:.3f}" if views.weight is not None else ""
    fig = figures.plot_rectification(
        _first_channel(image_patch),
        label_patch,
        views.teacher,
        views.m,
        views.rectified,
        output.folder / "rectification.png",
        threshold=views.threshold,
        spacing=case.spacing,
        title=f"{case.case_id}, one {size[0]}×{size[1]}×{size[2]} patch, teacher at iteration {step}{weight}",
    )
    output.result.figures["rectification"] = fig
    if label_patch is not None:
        scores = {k: mean_foreground_dice(v.argmax(0), label_patch, v.shape[0]) for k, v in arrays.items()}
        section.html(
            table(
                ["", "teacher ȳ", "M(x)", "rectified ȳ_r"],
                [
                    ["Dice vs ground truth %", *(f"{100 * scores[k]:.2f}" for k in arrays)],
                    [
                        f"reliable (conf ≥ τ={views.threshold}) %",
                        *(f"{100 * (v.max(0) >= views.threshold).mean():.1f}" for v in arrays.values()),
                    ],
                ],
            )
        )
    if step < views.start:
        section.note(
            f"At iteration {step} rectification was not active yet (S = {views.start}): training used ȳ; "
            "the figure shows what rectification would give."
        )
    section.image(fig.path, "pseudo-label rectification: teacher pseudo-label, M(x), rectified", fig.width, fig.height)
    output.say("rectification figure")
    return section
