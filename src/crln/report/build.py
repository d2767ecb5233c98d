"""``crln report``: one run folder → PNG figures and a self-contained ``report.html``.

What the report holds, each part only when its inputs exist (a missing part becomes a note):

- run facts from ``config.yaml`` and ``meta.json``;
- training curves from ``log.jsonl``;
- the evaluation from ``eval/per_case.csv`` + ``eval/summary.json``: bootstrapped summary and the
  per-case table sorted worst first;
- for the worst, median and best test cases (by Dice): slice overlays and a 3D surface render
  (needs a checkpoint and the dataset; 3 sliding-window predictions, nothing else);
- for CRLN runs: the rectification of one patch (teacher pseudo-label, M(x), rectified).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crln.atomic import atomic_write_text, check_output_dir
from crln.data.transforms import normalize_intensity
from crln.engine.run_folder import RunFolder, read_log
from crln.errors import CrlnError
from crln.evaluation import per_class_metric_names, read_per_case
from crln.report import figures
from crln.report.page import Section, render_page, table

__all__ = ["ReportResult", "build_report"]

METRIC_LABELS = {"dice": "Dice", "jaccard": "Jaccard", "asd": "ASD", "hd95": "95HD"}


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    html: Path
    figures: dict[str, figures.SavedFigure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


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


def _mean_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes ``1..C-1`` (empty vs empty = 1), as the evaluation's ``dice``."""
    scores = []
    for c in range(1, max(num_classes, 2)):
        p, g = pred == c, label == c
        denom = p.sum() + g.sum()
        scores.append(1.0 if denom == 0 else float(2.0 * (p & g).sum() / denom))
    return float(np.mean(scores))


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


def _rectification_arrays(method: Any, image_patch: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """Teacher ȳ, softmax M(x) and rectified ȳ_r probabilities ``(K, H, W, D)`` on one patch ``(H, W, D)`` or
    ``(C, H, W, D)``."""
    weak = torch.from_numpy(np.ascontiguousarray(image_patch, dtype=np.float32))
    weak = (weak[None] if weak.ndim == 4 else weak[None, None]).to(device)  # (1, C, h, w, d)
    with torch.no_grad():
        logits, feats = method.teacher(weak, return_features=True)
        m = method.teacher_dim(feats["quarter"], feats["half"])
        rect = method.rectifier(logits, m)
    return {
        "teacher": torch.softmax(logits.float(), 1)[0].cpu().numpy(),
        "m": torch.softmax(m.float(), 1)[0].cpu().numpy(),
        "rectified": torch.softmax(rect.float(), 1)[0].cpu().numpy(),
    }


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
    :func:`crln.evaluation.inference_stride` and ``eval.sw_batch_size``). Raises :class:`CrlnError`
    when ``run_dir`` is not a run folder, ``out_dir`` is a file, or an option is out of range.
    """
    from crln.config import build_config
    from crln.engine.device import resolve_device

    start = time.perf_counter()
    if out_dir is not None:
        check_output_dir(out_dir, "-o")
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise CrlnError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise CrlnError(f"{run.path}: not a run folder (no config.yaml; expected a folder written by crln train)")
    try:
        config = build_config(yaml.safe_load(run.config_path.read_text()) or {})
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise CrlnError(f"{run.config_path}: cannot read the run's config ({err})") from err
    out = check_output_dir(out_dir if out_dir is not None else run.path / "report", "-o")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise CrlnError(f"--sw-batch-size: expected at least 1 window per forward pass, got {sw_batch_size}")
    dev = resolve_device(device, "--device")
    if stride is not None:
        from crln.evaluation import inference_stride

        inference_stride(config, stride, config.data.root, run.path)  # refuse a bad --stride before any work
    out.mkdir(parents=True, exist_ok=True)
    result = ReportResult(html=out / "report.html")
    notes = result.notes

    def say(message: str) -> None:
        if progress:
            print(f"report: {message}", flush=True)

    meta = _read_json(run.path / "meta.json") or {}
    records = read_log(run.log_path)
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_dice" in r]
    is_crln = config.method.name == "crln"
    rectify_start = getattr(config.method, "rectify_start", None) if is_crln else None

    # --- facts ----------------------------------------------------------------------------
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
    if is_crln:
        fact_rows.append(["rectification start S", str(rectify_start)])
    for key in ("git_commit", "torch_version", "host", "cuda_device", "started", "command"):
        if meta.get(key):
            fact_rows.append([key.replace("_", " "), str(meta[key])])
    facts.html(table(["", ""], fact_rows, cls="facts"))
    facts.html(
        "<details><summary>resolved config.yaml</summary><pre>"
        + __import__("html").escape(run.config_path.read_text())
        + "</pre></details>"
    )

    # --- curves ---------------------------------------------------------------------------
    curves = Section("Training curves")
    if not records:
        notes.append("no log.jsonl records: no training curves")
        curves.note("log.jsonl is missing or empty: no training curves.")
    else:
        fig = figures.plot_training_curves(
            records, out / "curves.png", rectify_start=rectify_start, title=f"{config.method.name}: training log"
        )
        if fig is None:
            curves.note("log.jsonl holds no plottable scalars.")
        else:
            result.figures["curves"] = fig
            curves.image(fig.path, "training curves", fig.width, fig.height)
            if rectify_start is not None:
                curves.html(f'<p class="muted">dashed line: rectification starts (S = {rectify_start}).</p>')
        say("training curves")

    # --- evaluation -----------------------------------------------------------------------
    evaluation = Section("Evaluation")
    per_case_path, summary_path = run.eval_dir / "per_case.csv", run.eval_dir / "summary.json"
    per_case: list[dict[str, Any]] = []
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if per_case_path.is_file():
        try:
            per_case = read_per_case(per_case_path)
        except (OSError, csv.Error) as err:
            notes.append(f"cannot read {per_case_path}: {err}")
    if not per_case:
        message = f"no evaluation yet ({per_case_path} missing): run `crln evaluate {run.path}`"
        notes.append(message)
        evaluation.note(message + ", then `crln report` again.")
    else:
        unit = (summary or {}).get("distance_unit", "voxels")
        if summary and summary.get("metrics"):
            rows = []
            class_names = per_class_metric_names(summary["metrics"])
            for name in (*METRIC_LABELS, *class_names):
                stats = summary["metrics"].get(name)
                if not stats:
                    continue
                base, cls = _class_of(name) if name in class_names else (name, "")
                scale = 100.0 if base in ("dice", "jaccard") else 1.0
                suffix = " %" if scale == 100.0 else f" {unit}"
                if cls:
                    label = f"{METRIC_LABELS[base]} class {cls}"
                elif class_names:
                    label = f"{METRIC_LABELS[base]} (mean over classes)"
                else:
                    label = METRIC_LABELS[base]
                rows.append(
                    [
                        label + suffix,
                        f"{_fmt(stats.get('boot_mean'), scale)} ± {_fmt(stats.get('boot_std'), scale)}",
                        f"{_fmt(stats.get('mean'), scale)} ± {_fmt(stats.get('std'), scale)}",
                        str(stats.get("n", "")),
                    ]
                )
            evaluation.html(table(["metric", "bootstrap mean ± std", "mean ± std (cases)", "n"], rows))
            evaluation.html(
                '<p class="muted">'
                + __import__("html").escape(
                    f"{summary.get('n_cases')} cases of split {summary.get('split')!r}, checkpoint "
                    f"{Path(str(summary.get('checkpoint', ''))).name} (iteration {summary.get('checkpoint_step')}), "
                    f"patch {summary.get('patch_size')}, stride {summary.get('stride')}, "
                    f"largest component {summary.get('largest_component')}, {summary.get('date', '')}"
                )
                + "</p>"
            )
        else:
            evaluation.note(f"{summary_path} missing or unreadable: per-case table only.")
        ranked = sorted(per_case, key=lambda r: np.nan_to_num(r.get("dice", np.nan), nan=-1.0))
        # with several foreground classes, one Dice column per class after the means
        class_dice = [n for n in per_class_metric_names(per_case[0]) if n.startswith("dice_")]
        evaluation.heading("Per case, worst first")
        evaluation.html(
            table(
                [
                    "case",
                    "Dice %" if not class_dice else "Dice % (mean)",
                    "Jaccard %",
                    f"ASD ({unit})",
                    f"95HD ({unit})",
                    *(f"Dice class {_class_of(n)[1]} %" for n in class_dice),
                    "seconds",
                ],
                [
                    [
                        r["case"],
                        _fmt(r.get("dice"), 100),
                        _fmt(r.get("jaccard"), 100),
                        _fmt(r.get("asd")),
                        _fmt(r.get("hd95")),
                        *(_fmt(r.get(n), 100) for n in class_dice),
                        _fmt(r.get("seconds")),
                    ]
                    for r in ranked
                ],
                row_classes=["worst" if i == 0 else "" for i in range(len(ranked))],
            )
        )
        say("evaluation tables")

    # --- cases: overlays, renders, rectification -----------------------------------------
    cases_section = Section("Test cases: slices and surfaces")
    rect_section = Section("CRLN pseudo-label rectification") if is_crln else None
    checkpoint_path = next(
        (run.checkpoint(w) for w in ("final", "latest", "best") if run.checkpoint(w).is_file()), None
    )
    if checkpoint_path is None:
        message = "no checkpoint in the run folder: no slice overlays, renders or rectification figure"
        notes.append(message)
        cases_section.note(message + ".")
    else:
        _case_figures(
            run,
            config,
            checkpoint_path,
            per_case,
            summary,
            out,
            dev,
            cases_section,
            rect_section,
            result,
            say,
            (stride, sw_batch_size),
        )

    sections = [facts, curves, evaluation, cases_section]
    if rect_section is not None:
        sections.append(rect_section)
    if notes:
        missing = Section("Notes")
        for note in notes:
            missing.note(note)
        sections.insert(1, missing)
    title = f"crln report: {config.method.name} on {config.data.name}"
    subtitle = f"{run.path} · iteration {last_step} · written {time.strftime('%Y-%m-%d %H:%M:%S')}"
    atomic_write_text(result.html, render_page(title, subtitle, sections))
    result.seconds = time.perf_counter() - start
    say(f"written {result.html} ({result.seconds:.1f} s)")
    return result


def _case_figures(
    run: RunFolder,
    config: Any,
    checkpoint_path: Path,
    per_case: list[dict[str, Any]],
    summary: dict[str, Any] | None,
    out: Path,
    device: torch.device,
    section: Section,
    rect_section: Section | None,
    result: ReportResult,
    say: Any,
    window: tuple[tuple[int, int, int] | None, int | None],
) -> None:
    from crln.data.sources import open_dataset_root
    from crln.engine.checkpoint import load_checkpoint
    from crln.engine.trainer import method_from_checkpoint
    from crln.evaluation import inference_stride
    from crln.inference import optimize_for_inference, sliding_window_predict, window_count

    notes = result.notes
    try:
        state = load_checkpoint(checkpoint_path, map_location="cpu")
        method, ckpt_config = method_from_checkpoint(state)
    except (CrlnError, OSError, RuntimeError, KeyError) as err:
        message = f"cannot load {checkpoint_path.name}: {err}"
        notes.append(message)
        section.note(message)
        return
    method = method.to(device).eval()
    network = optimize_for_inference(method.inference_network(ckpt_config.eval.network), device)
    step = int(state.get("step", 0))
    root = Path(str((summary or {}).get("data_root") or ckpt_config.data.root))
    try:
        dataset = open_dataset_root(root, ckpt_config.data.format)
        chosen = _choose_cases(per_case)
        if not chosen:
            first = dataset.ids((summary or {}).get("split") or ckpt_config.data.test_split)[:1]
            chosen = [("first test case", first[0], None)] if first else []
            if chosen:
                section.note("No evaluation yet: showing the first test case instead of the worst, median and best.")
        cases = dataset.load_many([c[1] for c in chosen], with_label=True) if chosen else []
    except (CrlnError, OSError, ValueError, KeyError) as err:
        message = f"dataset {root} not readable ({err}): no slice overlays or renders"
        notes.append(message)
        section.note(message)
        return
    if not cases:
        section.note(f"no test cases found in {root}.")
        return
    num_classes = ckpt_config.data.num_classes
    stride, stride_note = inference_stride(ckpt_config, window[0], root, run.path)
    sw_batch_size = window[1] or ckpt_config.eval.sw_batch_size
    if stride_note:
        say(stride_note)
        section.note(f"Sliding window: {stride_note}.")
    unit = (summary or {}).get("distance_unit") or (
        "voxels" if all(tuple(c.spacing) == (1.0, 1.0, 1.0) for c in cases) else "mm"
    )
    section.html(
        f'<p class="muted">checkpoint {checkpoint_path.name} (iteration {step}); green: ground truth, '
        "magenta dashed: prediction; confidence = max softmax probability.</p>"
    )
    chosen_arrays = []
    for (role, case_id, dice_value), case in zip(chosen, cases):
        t0 = time.perf_counter()
        windows = window_count(case.shape, ckpt_config.data.patch_size, stride)
        say(f"predicting {case_id} ({role}): {windows} windows, stride {list(stride)} ...")
        with torch.no_grad():
            probs = sliding_window_predict(
                lambda x: network(x),
                normalize_intensity(case.image, ckpt_config.data.intensity),
                patch_size=ckpt_config.data.patch_size,
                stride=stride,
                num_classes=num_classes,
                sw_batch_size=sw_batch_size,
                device=device,
            )
        probs_np = probs.float().cpu().numpy()
        pred = probs_np.argmax(0).astype(np.uint8)
        confidence = probs_np.max(0)
        label = case.label
        dice_now = _mean_dice(pred, label, num_classes) if label is not None else None
        shown = dice_value if dice_value is not None else dice_now
        heading = f"{role}: {case_id}" + (f" (Dice {100 * shown:.2f}%)" if shown is not None else "")
        safe = role.replace(" ", "_")
        overlay = figures.plot_slice_overlay(
            _first_channel(case.image),
            label,
            pred,
            confidence,
            out / f"overlay_{safe}.png",
            spacing=case.spacing,
            num_classes=num_classes,
            title=heading,
        )
        render = figures.plot_surface_render(
            label, pred, out / f"render_{safe}.png", spacing=case.spacing, distance_unit=unit, title=heading
        )
        result.figures[f"overlay_{safe}"] = overlay
        result.figures[f"render_{safe}"] = render
        section.heading(heading)
        section.image(overlay.path, f"slice overlay of {case_id}", overlay.width, overlay.height)
        section.image(render.path, f"3D surface render of {case_id}", render.width, render.height)
        chosen_arrays.append((role, case_id, case))
        say(f"{role} case {case_id} ({time.perf_counter() - t0:.1f} s)")

    if rect_section is None:
        return
    cfg = method.config
    if not getattr(cfg, "dim", False) or getattr(method, "teacher_dim", None) is None:
        rect_section.note("This CRLN run has the DIM off (method.dim=false): there is no M(x) to rectify with.")
        return
    role, case_id, case = next((c for c in chosen_arrays if c[0] == "median"), chosen_arrays[0])
    centre = figures.object_centre(case.label > 0 if case.label is not None else None, shape=case.shape)
    size = tuple(int(s) for s in ckpt_config.data.patch_size)
    image_patch = _crop(case.image, centre, size)
    label_patch = _crop(case.label, centre, size) if case.label is not None else None
    arrays = _rectification_arrays(method, image_patch, device)
    active = step >= cfg.rectify_start
    mu = method.rectifier.mu()
    mu_text = f", μ = {float(mu.detach()):.3f}" if mu is not None else ""
    fig = figures.plot_rectification(
        _first_channel(image_patch),
        label_patch,
        arrays["teacher"],
        arrays["m"],
        arrays["rectified"],
        out / "rectification.png",
        threshold=cfg.confidence_threshold,
        spacing=case.spacing,
        title=f"{case_id}, one {size[0]}×{size[1]}×{size[2]} patch, teacher at iteration {step}{mu_text}",
    )
    result.figures["rectification"] = fig
    if label_patch is not None:
        scores = {k: _mean_dice(v.argmax(0), label_patch, v.shape[0]) for k, v in arrays.items()}
        rect_section.html(
            table(
                ["", "teacher ȳ", "M(x)", "rectified ȳ_r"],
                [
                    ["Dice vs ground truth %", *(f"{100 * scores[k]:.2f}" for k in ("teacher", "m", "rectified"))],
                    [
                        f"reliable (conf ≥ τ={cfg.confidence_threshold}) %",
                        *(f"{100 * (arrays[k].max(0) >= cfg.confidence_threshold).mean():.1f}" for k in arrays),
                    ],
                ],
            )
        )
    if not active:
        rect_section.note(
            f"At iteration {step} rectification was not active yet (S = {cfg.rectify_start}): training used ȳ; "
            "the figure shows what rectification would give."
        )
    rect_section.image(fig.path, "CRLN rectification: teacher pseudo-label, M(x), rectified", fig.width, fig.height)
    say("rectification figure")
