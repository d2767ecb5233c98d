"""Downsampled copies of h5 datasets (e.g. half-resolution LA for quick runs on a CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from crln.atomic import atomic_path, atomic_write_text
from crln.data.h5 import locate_case, read_case_list, read_h5_case, write_h5_case
from crln.errors import CrlnError

__all__ = [
    "PREPARE_MANIFEST",
    "SCALE_RECORD",
    "check_resume_manifest",
    "prepare_h5_dataset",
    "recorded_preparation",
    "recorded_scale",
    "resample_image",
    "resample_label",
    "training_data_record",
]

_PROGRESS_EVERY = 10
#: File in which ``prepare_h5_dataset`` records a copy's scale; inference reads it to adapt strides.
SCALE_RECORD = "crln_scale.json"
#: Folders above a scan searched for :data:`SCALE_RECORD` (``<root>/<id>/mri_norm2.h5`` is two levels down).
_SCALE_SEARCH_DEPTH = 3
#: File in which every ``crln data prepare`` records what it was run with, so that a resume with other options
#: (whose finished cases would be skipped although they no longer match) is refused.
PREPARE_MANIFEST = "prepare.json"


def recorded_scale(path: str | Path) -> float:
    """The scale of the data at ``path`` (a dataset folder, or a scan inside one).

    That is the ``scale`` that ``crln data prepare --scale`` recorded in :data:`SCALE_RECORD` of
    ``path`` or of the first of the :data:`_SCALE_SEARCH_DEPTH` folders above it that holds one;
    data without a record (raw or the field's files) is at scale 1.
    """
    path = Path(path)
    for folder in [path, *path.parents][: _SCALE_SEARCH_DEPTH + 1]:
        record = folder / SCALE_RECORD
        if record.is_file():
            try:
                scale = float(json.loads(record.read_text())["scale"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                reason = f"unreadable scale record ({err})"
                raise CrlnError(f'{record}: {reason}, expected {{"scale": <number>}}') from None
            if not scale > 0:
                raise CrlnError(f"{record}: scale {scale}, expected a positive number")
            return scale
    return 1.0


def recorded_preparation(root: str | Path) -> dict[str, Any] | None:
    """``{"dataset", "options"}`` of the ``crln data prepare`` pipeline that wrote the dataset at ``root``.

    A rescaled copy (``dataset: rescale``) is followed to its source, so a 0.5-scale copy of a BraTS folder
    prepared here reports ``brats``. None when no :data:`PREPARE_MANIFEST` says (the field's files, a
    user's own NIfTI, a source moved away).
    """
    folder = Path(root)
    for _ in range(_SCALE_SEARCH_DEPTH):  # a copy of a copy of a copy at most
        path = folder / PREPARE_MANIFEST
        try:
            manifest = json.loads(path.read_text())
            dataset, options = manifest["dataset"], dict(manifest["options"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if dataset != "rescale":
            return {"dataset": dataset, "options": options}
        folder = Path(str(options.get("source", "")))
    return None


def training_data_record(root: str | Path) -> dict[str, Any]:
    """What inference needs to know of a run's training data at ``root``, recorded in its ``meta.json`` and
    its ``model_final.pt``: ``data_scale`` (:func:`recorded_scale`, to adapt ``eval.stride`` to data at other
    scales) and ``data_preparation`` (:func:`recorded_preparation`, to prepare raw scans as it was)."""
    return {"data_scale": recorded_scale(root), "data_preparation": recorded_preparation(root)}


def check_resume_manifest(dst: Path, dataset: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The :data:`PREPARE_MANIFEST` of an earlier run into ``dst``, or None when there is none.

    Raises:
        CrlnError: it is unreadable, or records another ``dataset`` or other ``options`` (naming both).
    """
    path = dst / PREPARE_MANIFEST
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CrlnError(f"{path}: unreadable ({err}); remove it or use a new --dst") from None
    if not isinstance(previous, dict):
        raise CrlnError(f"{path}: expected a JSON object recording a prepare run; remove it or use a new --dst")
    if previous.get("dataset") != dataset or previous.get("options") != options:
        raise CrlnError(
            f"{path}: written by another dataset or other options (recorded: {previous.get('dataset')} "
            f"{previous.get('options')}; requested: {dataset} {options}), expected the same to resume; use a new --dst"
        )
    return previous


def _check_rescale_resume(dst: Path, options: dict[str, Any], scale: float, outputs: Sequence[Path]) -> None:
    """Refuse to resume into ``dst`` unless it was prepared with the same ``options`` (its cases are skipped)."""
    if check_resume_manifest(dst, "rescale", options) is not None:
        return
    record = dst / SCALE_RECORD
    if record.is_file():  # prepared before the manifest existed: its scale is all there is to compare
        if not math.isclose(recorded_scale(dst), scale):
            raise CrlnError(
                f"{dst}: prepared at scale {recorded_scale(dst):g} ({record}), requested {scale:g}; "
                "expected the same scale to resume, use a new --dst"
            )
    elif any(out.is_file() for out in outputs):
        raise CrlnError(
            f"{dst}: holds prepared cases but neither {PREPARE_MANIFEST} nor {SCALE_RECORD} records their options "
            f"(requested {options}); expected an empty folder or one to resume, use a new --dst"
        )


def _out_shape(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
    return tuple(max(1, round(s * scale)) for s in shape)  # type: ignore[return-value]


def resample_image(image: np.ndarray, size: Sequence[int], mode: Literal["area", "trilinear"] = "area") -> np.ndarray:
    """Resize ``(H, W, D)`` or ``(C, H, W, D)`` to spatial ``size`` by area averaging or trilinear."""
    if mode not in ("area", "trilinear"):
        raise CrlnError(f"image_mode = {mode!r}, expected 'area' or 'trilinear'")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x[None, None] if x.ndim == 3 else x[None]
    kw = {"align_corners": False} if mode == "trilinear" else {}
    y = F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, **kw)[0]
    return (y[0] if image.ndim == 3 else y).numpy()


def resample_label(
    label: np.ndarray, size: Sequence[int], mode: Literal["majority", "nearest"] = "majority"
) -> np.ndarray:
    """Resize a ``(H, W, D)`` label: majority vote (one-hot, area average, argmax) or nearest."""
    size = tuple(int(s) for s in size)
    if mode == "nearest":
        x = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None, None]
        return F.interpolate(x, size=size, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    if mode != "majority":
        raise CrlnError(f"label_mode = {mode!r}, expected 'majority' or 'nearest'")
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    k = int(lab.max()) + 1 if lab.numel() else 1
    onehot = F.one_hot(lab, k).permute(3, 0, 1, 2)[None].float()  # (1, K, H, W, D)
    votes = F.interpolate(onehot, size=size, mode="area")
    return votes[0].argmax(0).numpy().astype(np.uint8)


def _is_within(child: Path, parent: Path) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def _case_lists(src: Path, splits: Sequence[str] | None) -> tuple[list[Path], list[str]]:
    """The ``*.list`` / ``*.txt`` files of ``src`` (only ``splits`` when given) and their case ids, first seen first."""
    lists = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".list", ".txt"))
    if splits is not None:
        wanted = set(splits)
        lists = [p for p in lists if p.stem in wanted or p.name in wanted]
        missing = wanted - {p.stem for p in lists} - {p.name for p in lists}
        if missing:
            raise CrlnError(f"{src}: no case list for splits {sorted(missing)}")
    if not lists:
        raise CrlnError(f"{src}: no *.list or *.txt case lists found")
    ids: list[str] = []
    for lst in lists:
        ids += [c for c in read_case_list(src, lst.name) if c not in ids]
    return lists, ids


def prepare_h5_dataset(
    src: str | Path,
    dst: str | Path,
    *,
    scale: float = 0.5,
    image_mode: Literal["area", "trilinear"] = "area",
    label_mode: Literal["majority", "nearest"] = "majority",
    splits: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a downsampled copy of the h5 dataset ``src`` to ``dst``.

    Every case of every ``*.list`` / ``*.txt`` in ``src`` (or only ``splits``) is resized to
    ``round(shape * scale)`` per axis and written to the same relative path under ``dst``; the lists
    are copied. Each file is written atomically and existing outputs are skipped, so an interrupted
    run resumes where it stopped; :data:`PREPARE_MANIFEST` records the options, and a resume with
    other ones (another scale, modes or source) is refused.

    Returns:
        ``{"cases", "written", "skipped", "seconds", "bytes", "dst"}``.

    Raises:
        CrlnError: bad arguments, ``dst`` equal to or inside ``src``, ``dst`` prepared with other options,
            or an unreadable case.
    """
    src, dst = Path(src), Path(dst)
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not src.is_dir():
        raise CrlnError(f"{src}: source dataset folder not found")
    if not scale > 0:
        raise CrlnError(f"scale = {scale}, expected a positive factor")
    if image_mode not in ("area", "trilinear"):
        raise CrlnError(f"image_mode = {image_mode!r}, expected 'area' or 'trilinear'")
    if label_mode not in ("majority", "nearest"):
        raise CrlnError(f"label_mode = {label_mode!r}, expected 'majority' or 'nearest'")
    if _is_within(dst, src):
        raise CrlnError(f"{dst}: destination is the source or inside it ({src}), expected a separate folder")
    lists, ids = _case_lists(src, splits)
    sources = [locate_case(src, cid) for cid in ids]
    outputs = [dst / path.relative_to(src) for path in sources]
    # Relative to the source's own scale, so a rescaled copy of a rescaled copy records the product.
    record = {"scale": scale * recorded_scale(src), "source": str(src)}
    options = {"scale": scale, "image_mode": image_mode, "label_mode": label_mode, "source": str(src.resolve())}
    _check_rescale_resume(dst, options, record["scale"], outputs)
    manifest = json.dumps({"dataset": "rescale", "source": str(src), "options": options}, indent=2) + "\n"

    t0 = time.perf_counter()
    written = skipped = n_bytes = 0
    for i, (cid, path, out) in enumerate(zip(ids, sources, outputs, strict=True), 1):
        if out.is_file() and out.stat().st_size > 0:
            skipped += 1
        else:
            if not written:  # before the first case, so that an interrupted run leaves its options behind
                atomic_write_text(dst / PREPARE_MANIFEST, manifest)
            case = read_h5_case(path, cid, with_label=True, allow_channels=True)
            size = _out_shape(case.shape, scale)
            image = resample_image(case.image, size, image_mode)
            label = resample_label(case.label, size, label_mode) if case.label is not None else None
            write_h5_case(out, image, label)
            written += 1
            n_bytes += out.stat().st_size
        if i % _PROGRESS_EVERY == 0 or i == len(ids):
            log(
                f"prepare {src.name} -> {dst.name}: {i}/{len(ids)} cases ({skipped} skipped), "
                f"{time.perf_counter() - t0:.1f} s"
            )
    for lst in lists:
        with atomic_path(dst / lst.name) as tmp:
            shutil.copyfile(lst, tmp)
    atomic_write_text(dst / PREPARE_MANIFEST, manifest)  # also upgrades a folder prepared before the manifest
    atomic_write_text(dst / SCALE_RECORD, json.dumps(record, indent=2) + "\n")
    return {
        "cases": len(ids),
        "written": written,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
        "bytes": n_bytes,
        "dst": str(dst),
    }
