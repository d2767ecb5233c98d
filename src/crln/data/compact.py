"""Compact copy of an h5 dataset: 8-bit indices into each case's table of distinct float32 values.

The field's LA volumes are z-scored 8-bit MRI: about 190 distinct float32 values per volume. A case
whose image holds at most 256 distinct values is stored as a ``uint8`` index volume plus the table
of those values (as bit patterns, so ``table[index]`` gives back every float bit for bit, -0.0 and
NaN payloads included). The table is in numeric order, so neighbouring intensities get neighbouring
indices; the index volume is delta-coded along H (mod 256) and compressed (zlib, or lzma for the
smallest files). A volume with more distinct values falls back to lossless float32, compressed
either as is or split into four byte planes, whichever is smaller. Labels are ``uint8``, compressed.

Layout of a compact folder (``crln data compact --src H5ROOT --dst OUT``)::

    OUT/crln_compact.json     manifest: format, codec, one entry per case (file, bytes, encoding, source stat)
    OUT/train.list, test.list the source's case lists, copied
    OUT/crln_scale.json ...   the source's records of its scale and preparation, where it has them
    OUT/cases/<id>.npz        one case: ``header`` (JSON), ``image`` (compressed bytes), ``table``, ``label``
    OUT/part1/, part2/ ...    with ``--max-part-mib``: self-contained folders of the same layout, each
                              within the size budget, merged back with ``crln data merge``

:func:`crln.data.sources.open_dataset_root` opens a folder holding ``crln_compact.json`` with
:class:`CompactDataset`, so training, evaluation and reports read it wherever they read h5 data.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crln import __version__
from crln.atomic import atomic_path, atomic_write_text, check_unshared_output_dir
from crln.data.case import Case
from crln.data.h5 import H5Dataset, locate_case, read_case_list, read_h5_case
from crln.data.prepare import PREPARE_MANIFEST, SCALE_RECORD
from crln.data.validate import validate_case
from crln.errors import CrlnError

__all__ = [
    "CODECS",
    "MANIFEST_NAME",
    "CompactDataset",
    "CompactSummary",
    "compact_h5_dataset",
    "decode_image",
    "encode_image",
    "is_compact_root",
    "merge_compact",
    "read_compact_case",
    "read_manifest",
    "value_table",
    "write_compact_case",
    "write_parts",
]

MANIFEST_NAME = "crln_compact.json"
FORMAT_NAME = "crln-compact"
FORMAT_VERSION = 1
CASES_DIR = "cases"
CASE_SUFFIX = ".npz"
PART_PREFIX = "part"
MAX_TABLE_VALUES = 256  # the most distinct values a uint8 index can address
ENCODING_INDEXED = "uint8_table"
ENCODING_FLOAT = "float32"
PREDICTOR_DELTA = "delta_h"  # index volume stored as differences along H, mod 256
PREDICTOR_BYTE_PLANES = "byte_planes"  # float32 bytes regrouped: all first bytes, all second bytes ...
PREDICTOR_NONE = "none"
FLOAT_BYTE_PLANES = 4
CODECS = ("zlib", "lzma")
DEFAULT_CODEC = "zlib"
ZLIB_LEVEL = 6  # zlib's default: level 9 made LA cases at most 0.3 % smaller, and writes slower
LZMA_PRESET = 6  # xz's default preset
MIB = 2**20
_LIST_SUFFIXES = (".list", ".txt")
_PART_NAME = re.compile(rf"^{PART_PREFIX}(\d+)$")
_MANIFEST_RESERVE_BYTES = 64 * 1024  # room kept in each part's budget for its manifest
# How the source data was made (its scale, its preparation): a run records both from its data folder
# (crln.data.prepare.training_data_record), so they travel with the copy, into each part and each merge.
_DATA_RECORDS = (SCALE_RECORD, PREPARE_MANIFEST)


# ----------------------------------------------------------------------------------------------------------
# encoding one volume


def value_table(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Table of the distinct float32 values of ``image`` and the uint8 index volume, or None if > 256 values.

    Args:
        image: float32 volume of any shape, e.g. ``(H, W, D)``.

    Returns:
        ``(table, index)``: ``table`` float32 ``(K,)`` in numeric order (K ≤ 256), ``index`` uint8 of
        ``image``'s shape, with ``table[index]`` bit-identical to ``image``.
    """
    bits = np.ascontiguousarray(image, dtype=np.float32).view(np.uint32).ravel()
    # distinct bit patterns, not distinct numbers: -0.0 and 0.0 (and NaN payloads) stay apart
    distinct, inverse = np.unique(bits, return_inverse=True)
    if distinct.size > MAX_TABLE_VALUES:
        return None
    values = distinct.view(np.float32)
    order = np.argsort(values, kind="stable")  # numeric order: smooth intensities give small deltas
    rank = np.empty(order.size, dtype=np.uint8)
    rank[order] = np.arange(order.size, dtype=np.uint8)
    return values[order], rank[inverse].reshape(image.shape)


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, ZLIB_LEVEL)
    if codec == "lzma":
        return lzma.compress(data, preset=LZMA_PRESET)
    raise CrlnError(f"--codec {codec!r}: expected one of {', '.join(CODECS)}")


def _decompress(payload: bytes, codec: str) -> bytes:
    if codec == "zlib":
        return zlib.decompress(payload)
    if codec == "lzma":
        return lzma.decompress(payload)
    raise ValueError(f"unknown codec {codec!r}")


def _delta_axis(ndim: int) -> int:
    return ndim - 3 if ndim >= 3 else 0  # H of (H, W, D) and of (C, H, W, D)


def _running_sum_uint8(delta: np.ndarray, axis: int) -> np.ndarray:
    """Invert the delta coding: running sum mod 256 along ``axis``.

    One vectorised add per slice: about 15x faster than ``np.cumsum`` along the first axis of a
    uint8 LA volume.
    """
    out = np.array(delta, dtype=np.uint8, copy=True)
    slices = np.moveaxis(out, axis, 0)
    for i in range(1, slices.shape[0]):
        np.add(slices[i], slices[i - 1], out=slices[i])  # uint8 arithmetic wraps mod 256
    return out


def encode_image(image: np.ndarray, codec: str = DEFAULT_CODEC) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode a float32 volume losslessly.

    Args:
        image: volume ``(H, W, D)`` or ``(C, H, W, D)``; cast to float32 first.
        codec: ``"zlib"`` or ``"lzma"``.

    Returns:
        ``(header, arrays)``: header fields (encoding, shape, codec, number of values) and the arrays to
        store: ``image`` (compressed bytes as uint8) and, for indexed volumes, ``table`` (float32).
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    header: dict[str, Any] = {"shape": list(image.shape), "codec": codec}
    indexed = value_table(image)
    if indexed is not None:
        table, index = indexed
        axis = _delta_axis(index.ndim)
        delta = np.diff(index, axis=axis, prepend=np.uint8(0)) if index.size else index
        header.update(encoding=ENCODING_INDEXED, predictor=PREDICTOR_DELTA, n_values=int(table.size))
        payload = _compress(np.ascontiguousarray(delta).tobytes(), codec)
        return header, {"image": np.frombuffer(payload, dtype=np.uint8), "table": table}
    # Byte planes help smooth continuous data; volumes with few thousand distinct values (e.g. an area
    # downsampling of 8-bit data) compress better as whole words. Both are tried; the smaller is kept.
    planes = np.ascontiguousarray(image.view(np.uint8).reshape(-1, FLOAT_BYTE_PLANES).T).tobytes()
    candidates = {PREDICTOR_BYTE_PLANES: _compress(planes, codec), PREDICTOR_NONE: _compress(image.tobytes(), codec)}
    predictor = min(candidates, key=lambda name: len(candidates[name]))
    header.update(encoding=ENCODING_FLOAT, predictor=predictor, n_values=None)
    return header, {"image": np.frombuffer(candidates[predictor], dtype=np.uint8)}


def decode_image(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Invert :func:`encode_image`: the float32 volume, bit for bit.

    Raises:
        ValueError: unknown encoding, or a payload that does not fill the recorded shape.
    """
    shape = tuple(int(s) for s in header["shape"])
    raw = np.frombuffer(_decompress(np.ascontiguousarray(arrays["image"]), header["codec"]), dtype=np.uint8)
    n_voxels = int(np.prod(shape))
    if header["encoding"] == ENCODING_INDEXED:
        if raw.size != n_voxels:
            raise ValueError(f"index payload holds {raw.size} voxels, the header says {n_voxels}")
        index = _running_sum_uint8(raw.reshape(shape), _delta_axis(len(shape))) if n_voxels else raw.reshape(shape)
        # np.take raises IndexError for an index outside the table (a corrupt file)
        return np.take(np.asarray(arrays["table"], dtype=np.float32), index)
    if header["encoding"] == ENCODING_FLOAT:
        if raw.size != n_voxels * FLOAT_BYTE_PLANES:
            raise ValueError(f"float payload holds {raw.size} bytes, the header says {n_voxels * FLOAT_BYTE_PLANES}")
        if header.get("predictor") == PREDICTOR_BYTE_PLANES:
            raw = raw.reshape(FLOAT_BYTE_PLANES, -1).T
        return raw.copy().view(np.float32).reshape(shape)
    raise ValueError(f"unknown image encoding {header['encoding']!r}")


# ----------------------------------------------------------------------------------------------------------
# one case file


def write_compact_case(path: str | Path, case: Case, codec: str = DEFAULT_CODEC) -> dict[str, Any]:
    """Write ``case`` atomically as one ``.npz`` (uncompressed container of compressed payloads).

    The written file is decoded again and compared bit for bit before it replaces ``path``.

    Returns:
        The header written (encoding, shape, codec, number of distinct values, label presence).
    """
    path = Path(path)
    header, arrays = encode_image(case.image, codec)
    header.update(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        case_id=case.case_id,
        spacing=[float(s) for s in case.spacing],
        affine=np.asarray(case.affine, dtype=np.float64).tolist(),
        has_label=case.label is not None,
    )
    if case.label is not None:
        label = np.ascontiguousarray(case.label, dtype=np.uint8)
        header["label_shape"] = list(label.shape)
        arrays["label"] = np.frombuffer(_compress(label.tobytes(), codec), dtype=np.uint8)
    arrays["header"] = np.array(json.dumps(header))
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
        back = read_compact_case(tmp, case.case_id, with_label=case.label is not None)
        same_image = np.array_equal(
            back.image.view(np.uint32), np.ascontiguousarray(case.image, np.float32).view(np.uint32)
        )
        same_label = case.label is None or np.array_equal(back.label, case.label)
        if not (same_image and same_label):  # never expected: the encoding is lossless by construction
            raise CrlnError(f"{path}: the written case does not decode to its source bit for bit; nothing written")
    return header


def read_compact_case(path: str | Path, case_id: str | None = None, *, with_label: bool = True) -> Case:
    """Read one compact case file.

    Returns:
        A :class:`Case`: image float32 ``(H, W, D)`` (or ``(C, H, W, D)``), label uint8 ``(H, W, D)`` or None.

    Raises:
        CrlnError: missing, truncated or corrupt file, another format or version, or no label when asked for one.
    """
    path = Path(path)
    if not path.is_file():
        raise CrlnError(f"{path}: compact case file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
                raise CrlnError(
                    f"{path}: format {header.get('format')!r} version {header.get('version')!r}, "
                    f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
                )
            arrays = {key: npz[key] for key in ("image", "table") if key in npz.files}
            image = decode_image(header, arrays)
            label = None
            if with_label:
                if not header.get("has_label"):
                    raise CrlnError(f"{path}: case has no label, expected a labelled case")
                raw = _decompress(npz["label"], header["codec"])
                label = np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(header["label_shape"])
    except CrlnError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
    ) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CrlnError(f"{path}: unreadable compact case (truncated or corrupt?): {reason}") from None
    return Case(
        case_id=case_id or str(header.get("case_id") or path.stem),
        image=image,
        label=label,
        spacing=tuple(header.get("spacing", (1.0, 1.0, 1.0))),
        affine=np.asarray(header.get("affine", np.eye(4)), dtype=np.float64),
        source=str(path),
    )


# ----------------------------------------------------------------------------------------------------------
# manifest and dataset


def is_compact_root(root: str | Path) -> bool:
    """Whether ``root`` holds a compact dataset (a ``crln_compact.json`` manifest)."""
    return (Path(root) / MANIFEST_NAME).is_file()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a compact folder.

    Raises:
        CrlnError: missing, unreadable, or another format or version.
    """
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CrlnError(f"{path}: not found, expected a compact dataset folder (crln data compact)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CrlnError(f"{path}: unreadable manifest ({exc.__class__.__name__}), rerun crln data compact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CrlnError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CrlnError(f"{path}: format version {manifest.get('version')!r}, this crln reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("cases"), dict):
        raise CrlnError(f"{path}: key 'cases' missing, expected one entry per case")
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


class CompactDataset:
    """A compact folder read like an h5 dataset: case lists plus one ``cases/<id>.npz`` per case.

    Loading decodes one case in a few tens of milliseconds, so nothing is cached; the arrays returned
    are the caller's own.

    Example:
        >>> ds = CompactDataset("data/LA_compact")
        >>> cases = ds.load_many(ds.ids("train")[:8])
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    def __repr__(self) -> str:
        return f"CompactDataset(root={str(self.root)!r})"

    def splits(self) -> list[str]:
        """Names of the case lists in the folder (``train``, ``test``...)."""
        return sorted(p.stem for p in self.root.iterdir() if p.is_file() and p.suffix in _LIST_SUFFIXES)

    def ids(self, split: str) -> list[str]:
        """Ids of ``<root>/<split>.list`` or ``.txt`` in file order."""
        return read_case_list(self.root, split)

    def path(self, case_id: str) -> Path:
        """The file of ``case_id``.

        Raises:
            CrlnError: the case is not in this folder (e.g. it is in another part).
        """
        entry = self.manifest["cases"].get(case_id)
        if entry is None:
            part = self.manifest.get("part")
            if part:
                hint = f"this folder is part {part['index']} of {part['count']}: merge all parts with crln data merge"
            elif self.manifest.get("parts_merged"):
                hint = "the folder holds merged parts, not all of them yet: merge the missing parts"
            else:
                hint = "rerun crln data compact to finish the copy"
            raise CrlnError(f"{self.root / MANIFEST_NAME}: case {case_id!r} is not in this compact copy ({hint})")
        return self.root / entry["file"]

    def load(self, case_id: str, with_label: bool = True) -> Case:
        """Decode one case: image ``(H, W, D)`` float32, label ``(H, W, D)`` uint8 (or None)."""
        return read_compact_case(self.path(case_id), case_id, with_label=with_label)

    def load_many(self, ids: Iterable[str] | Sequence[str], with_label: bool = True) -> list[Case]:
        """Load several cases in order."""
        return [self.load(cid, with_label=with_label) for cid in ids]


# ----------------------------------------------------------------------------------------------------------
# hooks of the format registry (crln.data_formats); a compact folder has no single-file scans

detect_root = is_compact_root


def open_root(root: Path) -> CompactDataset:
    """The compact dataset in ``root``."""
    return CompactDataset(root)


# ----------------------------------------------------------------------------------------------------------
# writing a compact copy


@dataclass
class CompactSummary:
    """What :func:`compact_h5_dataset` did."""

    dst: Path
    cases: int
    written: int
    skipped: int
    indexed: int
    float_fallback: int
    total_bytes: int
    source_bytes: int
    parts: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ratio = self.total_bytes / self.source_bytes if self.source_bytes else float("nan")
        parts = f", {len(self.parts)} parts" if self.parts else ""
        return (
            f"{self.cases} cases ({self.written} written, {self.skipped} already done; {self.indexed} as 8-bit "
            f"indices, {self.float_fallback} as float32), {self.total_bytes / MIB:.1f} MiB = {ratio:.2f} x "
            f"the source's {self.source_bytes / MIB:.1f} MiB{parts}"
        )


def _list_files(root: Path) -> list[Path]:
    """Case-list files of ``root``, the training list first."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _LIST_SUFFIXES)
    return sorted(files, key=lambda p: p.stem != "train")


def _ordered_ids(root: Path) -> list[tuple[str, list[str]]]:
    return [(p.name, read_case_list(root, p.name)) for p in _list_files(root)]


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _copy_records(sources: Sequence[Path], dst: Path) -> None:
    """Copy into ``dst`` each data record (scale, preparation) that ``dst`` lacks, from the first source holding it."""
    for name in _DATA_RECORDS:
        found = next((root / name for root in (dst, *sources) if (root / name).is_file()), None)
        if found is not None and found != dst / name:
            _copy_file(found, dst / name)


def _check_destination(dst: Path) -> None:
    """Refuse a ``dst`` that is a file, or a folder holding anything but a compact copy (e.g. another dataset,
    whose case lists the copy would overwrite). A copy writes its manifest before anything else, so an
    interrupted one is always recognised."""
    if not is_compact_root(dst):
        check_unshared_output_dir(dst, "--dst", f"a new or empty folder or a compact copy (with {MANIFEST_NAME})")


def _entry_done(root: Path, entry: dict[str, Any] | None, source: dict[str, int]) -> bool:
    if not entry or entry.get("source_bytes") != source["bytes"] or entry.get("source_mtime_ns") != source["mtime_ns"]:
        return False
    path = root / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"]


def compact_h5_dataset(
    src: str | Path,
    dst: str | Path,
    *,
    codec: str = DEFAULT_CODEC,
    max_part_mib: float | None = None,
    report: Callable[[str], None] | None = None,
    report_error: Callable[[str], None] | None = None,
) -> CompactSummary:
    """Write a compact copy of the h5 dataset ``src`` (every case of every case list) to ``dst``.

    Restartable: a case whose file and manifest entry exist, and whose source file has not changed
    since, is skipped. A bad case (unreadable, NaN or Inf voxels, labels outside ``[0, 255]``) is
    reported in one line and skipped; the others are still written, then one error sums up.

    Args:
        src: h5 dataset folder (the field's layout, with ``train.list``/``test.list`` or ``.txt``).
        dst: output folder.
        codec: ``"zlib"`` (fast loads) or ``"lzma"`` (about 9 % smaller on LA, slower to write and read).
        max_part_mib: also write ``dst/part1``, ``dst/part2`` ... each at most this many MiB (see :func:`write_parts`).
        report: called with one progress line per case written.
        report_error: called with one line per bad case (default: ``report``).

    Returns:
        A :class:`CompactSummary`.

    Raises:
        CrlnError: bad source or destination, a codec change in a restarted copy, or (after all the
            good cases are written) one line naming how many cases failed and the first reason.
    """
    src, dst = Path(src), Path(dst)
    say = report or (lambda line: None)
    say_error = report_error or say
    lists = _checked_sources(src, dst, codec, max_part_mib)
    manifest, old_cases = _start_manifest(src, dst, codec, lists)
    all_ids = list(dict.fromkeys(cid for _, ids in lists for cid in ids))
    written = skipped = 0
    failed: list[str] = []
    for number, cid in enumerate(all_ids, 1):
        try:
            entry, fresh = _copy_case(src, dst, cid, old_cases.get(cid), codec)
        except CrlnError as err:
            failed.append(str(err))
            say_error(f"[{number}/{len(all_ids)}] error: {err}")
            continue
        manifest["cases"][cid] = entry
        if not fresh:
            skipped += 1
            continue
        _write_manifest(dst, {**manifest, "cases": {**old_cases, **manifest["cases"]}})  # restart point
        written += 1
        values = f"{entry['n_values']} values" if entry["n_values"] is not None else "float32 fallback"
        say(f"[{number}/{len(all_ids)}] {cid}: {values}, {entry['bytes'] / MIB:.2f} MiB")

    manifest["complete"] = not failed
    manifest["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_manifest(dst, manifest)
    entries = manifest["cases"].values()
    summary = CompactSummary(
        dst=dst,
        cases=len(all_ids),
        written=written,
        skipped=skipped,
        indexed=sum(e["encoding"] == ENCODING_INDEXED for e in entries),
        float_fallback=sum(e["encoding"] == ENCODING_FLOAT for e in entries),
        total_bytes=sum(e["bytes"] for e in entries),
        source_bytes=sum(e["source_bytes"] for e in entries),
        failed=failed,
    )
    if failed:
        raise CrlnError(
            f"--src {src}: {len(failed)} of {len(all_ids)} cases failed (first: {failed[0]}); the other "
            f"{len(all_ids) - len(failed)} are in {dst}, fix the sources and rerun to finish"
        )
    if max_part_mib is not None:
        summary.parts = write_parts(dst, max_part_mib)
    return summary


def _checked_sources(src: Path, dst: Path, codec: str, max_part_mib: float | None) -> list[tuple[str, list[str]]]:
    """The source's case lists ``(file name, ids)``, after refusing bad options, sources and destinations."""
    if codec not in CODECS:
        raise CrlnError(f"--codec {codec!r}: expected one of {', '.join(CODECS)}")
    if max_part_mib is not None and max_part_mib <= 0:
        raise CrlnError(f"--max-part-mib: expected a positive size, got {max_part_mib}")
    if is_compact_root(src):
        raise CrlnError(f"--src {src}: already a compact copy, expected an h5 dataset")
    H5Dataset(src)  # checks the folder exists
    if os.path.realpath(src) == os.path.realpath(dst):
        raise CrlnError(f"--dst {dst}: the same folder as --src, expected a new folder")
    _check_destination(dst)
    lists = _ordered_ids(src)
    if not lists:
        raise CrlnError(f"--src {src}: no case lists (*.list or *.txt), expected train.list and test.list")
    return lists


def _start_manifest(
    src: Path, dst: Path, codec: str, lists: list[tuple[str, list[str]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh, incomplete manifest for ``dst`` and the case entries of an earlier, interrupted copy there;
    copies the case lists (and the scale record of a rescaled source) into ``dst``."""
    manifest: dict[str, Any] = read_manifest(dst) if is_compact_root(dst) else {}
    if manifest and manifest.get("codec") != codec:
        raise CrlnError(
            f"--dst {dst}: holds a copy written with --codec {manifest.get('codec')}, expected {codec} "
            "(use the same codec to finish it, or a new --dst)"
        )
    old_cases: dict[str, Any] = manifest.get("cases", {})
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "crln_version": __version__,
        "codec": codec,
        "source": str(src),
        "lists": [name for name, _ in lists],
        "complete": False,
        "cases": {},
    }
    dst.mkdir(parents=True, exist_ok=True)
    _write_manifest(dst, {**manifest, "cases": old_cases})  # first: a rerun after a kill finds its own folder
    for leftover in (dst / CASES_DIR).glob(".*.tmp"):  # a case write killed midway (crln.atomic's temp files)
        leftover.unlink(missing_ok=True)
    for name, _ in lists:
        _copy_file(src / name, dst / name)
    for name in _DATA_RECORDS:  # a copy of a rescaled source is at its scale
        if (src / name).is_file():
            _copy_file(src / name, dst / name)
    return manifest, old_cases


def _copy_case(
    src: Path, dst: Path, cid: str, old_entry: dict[str, Any] | None, codec: str
) -> tuple[dict[str, Any], bool]:
    """Case ``cid``'s manifest entry and whether it was written now (False: the earlier copy is current).

    Raises:
        CrlnError: the case is missing, unreadable, or has NaN/Inf voxels or labels outside ``[0, 255]``.
    """
    path = locate_case(src, cid)
    st = path.stat()
    source = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if _entry_done(dst, old_entry, source):
        assert old_entry is not None
        return old_entry, False
    case = read_h5_case(path, cid, with_label=True, allow_channels=True)
    validate_case(case, allow_channels=True)  # finite voxels, integer labels in [0, 255]
    rel = f"{CASES_DIR}/{cid}{CASE_SUFFIX}"
    header = write_compact_case(dst / rel, case, codec)
    entry = {
        "file": rel,
        "bytes": (dst / rel).stat().st_size,
        "encoding": header["encoding"],
        "n_values": header["n_values"],
        "shape": header["shape"],
        "source_bytes": source["bytes"],
        "source_mtime_ns": source["mtime_ns"],
    }
    return entry, True


# ----------------------------------------------------------------------------------------------------------
# parts and merging


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # parts share the case files of the full copy when the file system allows it
    except OSError:
        _copy_file(src, dst)


def _remove_old_parts(root: Path) -> None:
    for path in root.iterdir():
        if path.is_dir() and _PART_NAME.match(path.name) and (path / MANIFEST_NAME).is_file():
            shutil.rmtree(path)


def write_parts(root: str | Path, max_part_mib: float) -> list[Path]:
    """Split a complete compact copy into self-contained folders ``root/part1`` ... of at most ``max_part_mib`` MiB.

    Cases go in list order (the training list first, so ``part1`` holds the labelled cases), and a
    new part starts at each list boundary, so training parts hold no test cases. Every part holds
    all case lists, the data records and a manifest of its own cases; case files are hard links where possible.
    Earlier parts are replaced.

    Returns:
        The part folders, in order.

    Raises:
        CrlnError: the copy is incomplete, or one case alone exceeds the budget.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        raise CrlnError(f"{root / MANIFEST_NAME}: the copy is incomplete, rerun crln data compact before splitting")
    budget = int(max_part_mib * MIB)
    list_names = list(manifest["lists"])
    shared = [*list_names, *(name for name in _DATA_RECORDS if (root / name).is_file())]  # in every part
    fixed = sum((root / name).stat().st_size for name in shared) + _MANIFEST_RESERVE_BYTES
    groups: list[list[str]] = []
    assigned: set[str] = set()
    for name in list_names:
        current: list[str] = []
        used = fixed
        for cid in read_case_list(root, name):
            if cid in assigned:
                continue
            size = manifest["cases"][cid]["bytes"]
            if fixed + size > budget:
                raise CrlnError(
                    f"--max-part-mib {max_part_mib}: case {cid!r} alone takes {(fixed + size) / MIB:.2f} MiB "
                    "with the lists and manifest, expected a larger budget"
                )
            if used + size > budget:
                groups.append(current)
                current, used = [], fixed
            current.append(cid)
            used += size
            assigned.add(cid)
        if current:
            groups.append(current)

    _remove_old_parts(root)
    parts = []
    for number, ids in enumerate(groups, 1):
        part = root / f"{PART_PREFIX}{number}"
        for name in shared:
            _copy_file(root / name, part / name)
        for cid in ids:
            entry = manifest["cases"][cid]
            _link_or_copy(root / entry["file"], part / entry["file"])
        part_manifest = {
            **manifest,
            "cases": {cid: manifest["cases"][cid] for cid in ids},
            "complete": False,
            "part": {"index": number, "count": len(groups), "of": str(root)},
        }
        _write_manifest(part, part_manifest)
        parts.append(part)
    return parts


def merge_compact(sources: Sequence[str | Path], dst: str | Path) -> CompactSummary:
    """Merge compact folders (e.g. the parts of one copy) into ``dst``; a ``dst`` that is one already is kept.

    Every source must be a copy of the same h5 folder, with the same codec and the same case lists.
    Case files are copied atomically; a case already in ``dst`` with the same size is not copied again.
    The data records (scale, preparation) that ``dst`` lacks come from the first source holding them.

    Returns:
        A :class:`CompactSummary` of ``dst`` (``written`` = cases copied now).

    Raises:
        CrlnError: a source that is not a compact folder, or sources that disagree (source folder, codec, lists).
    """
    dst = Path(dst)
    if not sources:
        raise CrlnError("crln data merge: no source folders given, expected one or more compact folders")
    manifests = [(Path(s), read_manifest(s)) for s in sources]
    _check_destination(dst)
    base = read_manifest(dst) if is_compact_root(dst) else None
    reference_root, reference = (dst, base) if base is not None else manifests[0]
    for root, manifest in manifests:
        if manifest.get("codec") != reference.get("codec"):
            raise CrlnError(
                f"{root / MANIFEST_NAME}: codec {manifest.get('codec')!r}, expected {reference.get('codec')!r} "
                f"as {reference_root}"
            )
        if manifest.get("source") != reference.get("source"):  # e.g. a part of the 0.5-scale copy among full-scale ones
            raise CrlnError(
                f"{root / MANIFEST_NAME}: a copy of {manifest.get('source')}, expected a part of the copy of "
                f"{reference.get('source')} as {reference_root}"
            )
        if manifest.get("lists") != reference.get("lists"):
            raise CrlnError(
                f"{root / MANIFEST_NAME}: case lists {manifest.get('lists')}, expected {reference.get('lists')}"
            )
        for name in manifest["lists"]:
            expected = reference_root / name
            if not expected.is_file():  # a merge killed before it copied its lists
                expected = manifests[0][0] / name
            if (root / name).read_bytes() != expected.read_bytes():
                raise CrlnError(f"{root / name}: differs from {expected}, expected the same case list")

    merged = {key: value for key, value in reference.items() if key != "part"}
    cases = dict(base["cases"]) if base is not None else {}
    dst.mkdir(parents=True, exist_ok=True)
    if base is None:  # first: a rerun after a kill finds its own folder
        _write_manifest(dst, {**merged, "cases": {}, "complete": False, "parts_merged": True})
    for name in reference["lists"]:
        if not (dst / name).is_file():
            _copy_file(manifests[0][0] / name, dst / name)  # every source holds the same lists
    _copy_records([root for root, _ in manifests], dst)
    copied = 0
    for root, manifest in manifests:
        if os.path.realpath(root) == os.path.realpath(dst):
            continue
        for cid, entry in manifest["cases"].items():
            target = dst / entry["file"]
            if not (target.is_file() and target.stat().st_size == entry["bytes"]):
                source_file = root / entry["file"]
                if not source_file.is_file():
                    raise CrlnError(f"{root / MANIFEST_NAME}: lists case {cid!r} but {source_file} is missing")
                _copy_file(source_file, target)
                copied += 1
            cases[cid] = entry
    listed = {cid for name in reference["lists"] for cid in read_case_list(dst, name)}
    merged.update(cases=cases, complete=listed <= set(cases), parts_merged=True)
    _write_manifest(dst, merged)
    entries = cases.values()
    return CompactSummary(
        dst=dst,
        cases=len(cases),
        written=copied,
        skipped=len(cases) - copied,
        indexed=sum(e["encoding"] == ENCODING_INDEXED for e in entries),
        float_fallback=sum(e["encoding"] == ENCODING_FLOAT for e in entries),
        total_bytes=sum(e["bytes"] for e in entries),
        source_bytes=sum(e["source_bytes"] for e in entries),
    )
