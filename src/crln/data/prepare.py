"""Downsampled copies of h5 datasets (e.g. half-resolution LA for quick runs on a CPU)."""

from __future__ import annotations

import json
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

__all__ = ["SCALE_RECORD", "prepare_h5_dataset", "recorded_scale", "resample_image", "resample_label"]

_PROGRESS_EVERY = 10
#: File in which ``prepare_h5_dataset`` records a copy's scale; inference reads it to adapt strides.
SCALE_RECORD = "crln_scale.json"
#: Folders above a scan searched for :data:`SCALE_RECORD` (``<root>/<id>/mri_norm2.h5`` is two levels down).
_SCALE_SEARCH_DEPTH = 3


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
    run resumes where it stopped.

    Returns:
        ``{"cases", "written", "skipped", "seconds", "bytes", "dst"}``.

    Raises:
        CrlnError: bad arguments, ``dst`` equal to or inside ``src``, or an unreadable case.
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

    t0 = time.perf_counter()
    written = skipped = n_bytes = 0
    for i, cid in enumerate(ids, 1):
        path = locate_case(src, cid)
        out = dst / path.relative_to(src)
        if out.is_file() and out.stat().st_size > 0:
            skipped += 1
        else:
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
    # Relative to the source's own scale, so a rescaled copy of a rescaled copy records the product.
    record = {"scale": scale * recorded_scale(src), "source": str(src)}
    atomic_write_text(dst / SCALE_RECORD, json.dumps(record, indent=2) + "\n")
    return {
        "cases": len(ids),
        "written": written,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
        "bytes": n_bytes,
        "dst": str(dst),
    }
