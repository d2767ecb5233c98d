"""The field's h5 layout: one file per case with datasets ``image`` and ``label``, plus case lists.

Known layouts (all resolved by :func:`locate_case`):

- LA (UA-MT, MC-Net, BCP): ``<root>/2018LA_Seg_Training Set/<id>/mri_norm2.h5``, ``train.list``/``test.list``
- any ``<root>/**/<id>/<single file>.h5``
- Pancreas-CT (MC-Net, BCP): ``<root>/data/<id>_norm.h5`` (or ``<root>/**/<id>_norm.h5``)
- BraTS19 (SSL4MIS, TraCoCo): ``<root>/data/<id>.h5``, ``train.txt``/``val.txt``/``test.txt``
- flat: ``<root>/<id>.h5``
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from crln.atomic import atomic_path
from crln.data.case import Case
from crln.data.validate import is_real_numeric
from crln.errors import CrlnError

__all__ = [
    "H5Dataset",
    "clear_h5_cache",
    "h5_cache_bytes",
    "locate_case",
    "read_case_list",
    "read_h5_case",
    "set_h5_cache_limit",
    "write_h5_case",
]

_LIST_SUFFIXES = (".list", ".txt")
_LAYOUTS = (
    "<root>/**/<id>/<single>.h5 (LA: 2018LA_Seg_Training Set/<id>/mri_norm2.h5)",
    "<root>/**/<id>.h5 (BraTS19: data/<id>.h5)",
    "<root>/**/<id>_norm.h5 (Pancreas: data/<id>_norm.h5)",
)
_PREFERRED_IN_FOLDER = ("mri_norm2.h5",)


# ----------------------------------------------------------------------------------------------------------
# single file


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise CrlnError(f"{path}: file not found, expected an h5 case file")
    if path.stat().st_size == 0:
        raise CrlnError(f"{path}: file is empty (0 bytes), expected an HDF5 file")
    try:  # h5py would report a permission problem as a corrupt file
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CrlnError(f"{path}: cannot read ({exc.strerror}), expected a readable h5 case file") from None
    try:
        if not h5py.is_hdf5(path):
            raise CrlnError(f"{path}: not an HDF5 file (no HDF5 signature), expected an h5 case file")
        return h5py.File(path, "r")
    except CrlnError:
        raise
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CrlnError(f"{path}: unreadable HDF5 file (truncated or corrupt?): {msg}") from None


def _read_dataset(f: h5py.File, key: str, path: Path) -> np.ndarray:
    if key not in f:
        raise CrlnError(f"{path}: missing key {key!r}, found keys {sorted(f.keys())}, expected 'image' and 'label'")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise CrlnError(f"{path}: key {key!r} is a group, expected a dataset")
    try:
        return obj[()]
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CrlnError(f"{path}: key {key!r} cannot be read (truncated or corrupt?): {msg}") from None


def _label_to_uint8(label: np.ndarray, path: Path) -> np.ndarray:
    if label.dtype == np.uint8:
        return label
    if label.dtype != bool and not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
        raise CrlnError(f"{path}: key 'label' has dtype {label.dtype}, expected integer class indices")
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise CrlnError(f"{path}: key 'label' holds non-integer values, expected integer class indices")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise CrlnError(
            f"{path}: key 'label' has values in [{label.min()}, {label.max()}], expected class indices in [0, 255]"
        )
    return label.astype(np.uint8)


def read_h5_case(
    path: str | Path,
    case_id: str | None = None,
    *,
    with_label: bool = True,
    allow_channels: bool = False,
) -> Case:
    """Read one h5 case.

    Args:
        path: the h5 file, holding ``image`` ``(H, W, D)`` (or ``(C, H, W, D)`` with ``allow_channels``)
            and ``label`` ``(H, W, D)``.
        case_id: id to record; defaults to the parent folder name for ``<id>/<file>.h5`` files named
            like LA's ``mri_norm2.h5``, else the file stem without ``_norm``.
        with_label: read ``label`` (required then) or leave it ``None``.

    Returns:
        A :class:`Case` with image float32, label uint8, spacing ``(1, 1, 1)`` and identity affine.

    Raises:
        CrlnError: missing, empty, non-HDF5 or truncated file; missing key; wrong ndim; shape mismatch.
    """
    path = Path(path)
    if case_id is None:
        case_id = _default_case_id(path)
    with _open_h5(path) as f:
        image = _read_dataset(f, "image", path)
        label = _read_dataset(f, "label", path) if with_label else None
    ok_ndim = image.ndim == 3 or (allow_channels and image.ndim == 4)
    if not ok_ndim:
        expected = "3D (H, W, D) or 4D (C, H, W, D)" if allow_channels else "3D (H, W, D)"
        raise CrlnError(f"{path}: key 'image' has shape {image.shape} ({image.ndim}D), expected {expected}")
    if not is_real_numeric(image.dtype):
        raise CrlnError(f"{path}: key 'image' has dtype {image.dtype}, expected a real numeric array")
    image = image.astype(np.float32, copy=False)
    if label is not None:
        if label.ndim != 3:
            raise CrlnError(f"{path}: key 'label' has shape {label.shape} ({label.ndim}D), expected 3D (H, W, D)")
        if label.shape != image.shape[-3:]:
            raise CrlnError(
                f"{path}: key 'label' has shape {label.shape}, expected the image's spatial shape {image.shape[-3:]}"
            )
        label = _label_to_uint8(label, path)
    return Case(case_id=case_id, image=image, label=label, source=str(path))


def _default_case_id(path: Path) -> str:
    stem = path.name[: -len(".h5")] if path.name.endswith(".h5") else path.stem
    if stem in ("mri_norm2", "image", "data", "case") or stem.startswith("mri_norm"):
        return path.parent.name
    return stem[: -len("_norm")] if stem.endswith("_norm") else stem


def write_h5_case(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray | None = None,
    *,
    compression: str | None = "gzip",
) -> Path:
    """Write ``image`` ``(H, W, D)`` float32 (and ``label`` ``(H, W, D)`` uint8) atomically to ``path``."""
    path = Path(path)
    image = np.asarray(image, dtype=np.float32)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression=compression)
        if label is not None:
            f.create_dataset("label", data=np.asarray(label, dtype=np.uint8), compression=compression)
    return path


# ----------------------------------------------------------------------------------------------------------
# case lists and locating files


def _list_file(root: Path, split: str) -> Path:
    if split.endswith(_LIST_SUFFIXES):
        return root / split
    tried = [root / f"{split}{s}" for s in _LIST_SUFFIXES]
    for p in tried:
        if p.is_file():
            return p
    raise CrlnError(f"{root}: no case list for split {split!r}, tried {', '.join(p.name for p in tried)}")


def read_case_list(root: str | Path, split: str) -> list[str]:
    """Read the ids of ``<root>/<split>.list`` (or ``.txt``): one id a line, blank lines skipped.

    Raises:
        CrlnError: list missing, duplicate ids, or ids that hold path separators or ``..``.
    """
    root = Path(root)
    path = _list_file(root, split)
    if not path.is_file():
        raise CrlnError(f"{path}: case list not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CrlnError(f"{path}: case list unreadable: {exc}") from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    dups: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        cid = raw.strip()
        if not cid or cid.startswith("#"):
            continue
        if "/" in cid or "\\" in cid or ".." in cid or cid.startswith("~"):
            raise CrlnError(f"{path}: line {lineno} id {cid!r} holds a path separator or '..', expected a bare case id")
        if cid in seen:
            dups.append(f"{cid!r} (lines {seen[cid]} and {lineno})")
            continue
        seen[cid] = lineno
        ids.append(cid)
    if dups:
        raise CrlnError(f"{path}: duplicate ids {', '.join(dups[:5])}{', ...' if len(dups) > 5 else ''}")
    return ids


class _Index:
    """Every h5 file under a root, keyed by the ids it could belong to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_folder: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        self.by_norm_stem: dict[str, list[Path]] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            h5s = sorted(n for n in filenames if n.endswith(".h5") and not n.startswith("."))
            folder = Path(dirpath)
            for name in h5s:
                p = folder / name
                stem = name[: -len(".h5")]
                self.by_stem.setdefault(stem, []).append(p)
                if stem.endswith("_norm"):
                    self.by_norm_stem.setdefault(stem[: -len("_norm")], []).append(p)
            if h5s and folder != root:
                self.by_folder.setdefault(folder.name, []).extend(folder / n for n in h5s)

    def find(self, case_id: str) -> list[Path] | None:
        files = self.by_folder.get(case_id)
        if files:
            if len(files) == 1:
                return files
            preferred = [p for p in files if p.name in _PREFERRED_IN_FOLDER]
            return preferred or files
        stem = case_id[: -len(".h5")] if case_id.endswith(".h5") else case_id
        for table in (self.by_stem, self.by_norm_stem):
            if stem in table:
                return table[stem]
        return None


_INDEX_CACHE: dict[str, _Index] = {}
_INDEX_LOCK = threading.Lock()


def _index(root: Path, refresh: bool = False) -> _Index:
    key = os.path.realpath(root)
    with _INDEX_LOCK:
        idx = _INDEX_CACHE.get(key)
        if idx is None or refresh:
            idx = _Index(root)
            _INDEX_CACHE[key] = idx
        return idx


def _inside(path: Path, root: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def locate_case(root: str | Path, case_id: str) -> Path:
    """Resolve the h5 file of ``case_id`` under ``root`` (index of the root built once per process).

    Order: a folder named ``<id>`` holding one h5 file (``mri_norm2.h5`` preferred), then a file
    ``<id>.h5``, then ``<id>_norm.h5``, anywhere under the root.

    Raises:
        CrlnError: root missing, id unsafe, case not found (names the layouts tried), or ambiguous.
    """
    root = Path(root)
    if not root.is_dir():
        raise CrlnError(f"{root}: data root not found, expected a folder")
    if not case_id or "/" in case_id or "\\" in case_id or ".." in case_id:
        raise CrlnError(f"{root}: case id {case_id!r} holds a path separator or '..', expected a bare id")
    found = _index(root).find(case_id)
    if found is None or not all(p.is_file() for p in found):
        found = _index(root, refresh=True).find(case_id)  # files added since the index was built
    if not found:
        raise CrlnError(f"{root}: case {case_id!r} not found; layouts tried: {'; '.join(_LAYOUTS)}")
    if len(found) > 1:
        shown = ", ".join(str(p.relative_to(root)) for p in found[:4])
        raise CrlnError(f"{root}: case {case_id!r} is ambiguous, found {len(found)} h5 files: {shown}")
    path = found[0]
    if not _inside(path, root):
        raise CrlnError(f"{path}: case {case_id!r} resolves outside the data root {root}")
    return path


# ----------------------------------------------------------------------------------------------------------
# dataset with a per-process decode cache

# Decoded cases, least recently used first. The cache holds at most _CACHE_LIMIT bytes of arrays;
# beyond that the least recently used cases are dropped (they are decoded again when asked for).
# Callers that keep a Case (the trainer keeps its training set) keep its arrays alive regardless.
_CASE_CACHE: OrderedDict[tuple[str, int, int, bool, bool], Case] = OrderedDict()
_CASE_LOCK = threading.Lock()
_DEFAULT_CACHE_LIMIT = 8 * 2**30
_CACHE_LIMIT = (
    int(os.environ["CRLN_CACHE_BYTES"])
    if os.environ.get("CRLN_CACHE_BYTES", "").strip().isdigit()
    else _DEFAULT_CACHE_LIMIT
)


def _case_bytes(case: Case) -> int:
    return case.image.nbytes + (case.label.nbytes if case.label is not None else 0)


def set_h5_cache_limit(max_bytes: int) -> None:
    """Cap the per-process cache of decoded h5 cases (default 8 GiB, or ``$CRLN_CACHE_BYTES``).

    Eviction is least-recently-used; 0 disables caching of new cases.
    """
    global _CACHE_LIMIT
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    with _CASE_LOCK:
        _CACHE_LIMIT = int(max_bytes)
        _evict_locked()


def _evict_locked() -> None:
    total = sum(_case_bytes(c) for c in _CASE_CACHE.values())
    while _CASE_CACHE and total > _CACHE_LIMIT:
        _, dropped = _CASE_CACHE.popitem(last=False)
        total -= _case_bytes(dropped)


def h5_cache_bytes() -> int:
    """Bytes of arrays currently held by the decoded-case cache."""
    with _CASE_LOCK:
        return sum(_case_bytes(c) for c in _CASE_CACHE.values())


def clear_h5_cache() -> None:
    """Forget every decoded case and every root index (e.g. after files changed)."""
    with _CASE_LOCK:
        _CASE_CACHE.clear()
    with _INDEX_LOCK:
        _INDEX_CACHE.clear()


class H5Dataset:
    """An h5 dataset folder: case lists plus one h5 file per case.

    Decoded cases are cached per process (keyed by file, size and mtime), so gzip is paid once.
    The cache is bounded (8 GiB by default, :func:`set_h5_cache_limit` or ``$CRLN_CACHE_BYTES``)
    with least-recently-used eviction. Cached arrays are read-only: copy before changing them in place.

    Example:
        >>> ds = H5Dataset("../shared/data/LA")
        >>> cases = ds.load_many(ds.ids("train")[:8])
    """

    def __init__(self, root: str | Path, *, cache: bool = True, allow_channels: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CrlnError(f"{self.root}: data root not found, expected a folder with case lists")
        self.cache = cache
        self.allow_channels = allow_channels

    def __repr__(self) -> str:
        return f"H5Dataset(root={str(self.root)!r})"

    def splits(self) -> list[str]:
        """Names of the case lists in the root (``train``, ``test``, ``val``...)."""
        return sorted(p.stem for p in self.root.iterdir() if p.is_file() and p.suffix in _LIST_SUFFIXES)

    def ids(self, split: str) -> list[str]:
        """Ids of ``<root>/<split>.list`` or ``.txt`` in file order."""
        return read_case_list(self.root, split)

    def path(self, case_id: str) -> Path:
        """The h5 file of ``case_id``."""
        return locate_case(self.root, case_id)

    def load(self, case_id: str, with_label: bool = True) -> Case:
        """Read (or fetch from the cache) one case; image ``(H, W, D)`` float32, label uint8."""
        path = self.path(case_id)
        if not self.cache:
            return read_h5_case(path, case_id, with_label=with_label, allow_channels=self.allow_channels)
        st = path.stat()
        base = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        key = (*base, with_label, self.allow_channels)
        with _CASE_LOCK:
            # a labelled entry also serves an unlabelled request
            hit_key = next((k for k in ((*base, True, self.allow_channels), key) if k in _CASE_CACHE), None)
            hit = _CASE_CACHE[hit_key] if hit_key is not None else None
            if hit_key is not None:
                _CASE_CACHE.move_to_end(hit_key)
        if hit is None:
            hit = read_h5_case(path, case_id, with_label=with_label, allow_channels=self.allow_channels)
            hit.image.flags.writeable = False
            if hit.label is not None:
                hit.label.flags.writeable = False
            with _CASE_LOCK:
                _CASE_CACHE[key] = hit
                _evict_locked()
        # a fresh Case object so callers may rebind fields without touching the cache
        label = hit.label if with_label else None
        return Case(case_id, hit.image, label, hit.spacing, hit.affine.copy(), hit.source)

    def load_many(self, ids: Iterable[str] | Sequence[str], with_label: bool = True) -> list[Case]:
        """Load several cases in order (each decoded once per process)."""
        return [self.load(cid, with_label=with_label) for cid in ids]


# ----------------------------------------------------------------------------------------------------------
# hooks of the format registry (crln.data_formats)


def detect_root(root: Path) -> bool:
    """Whether ``root`` holds a case list (``*.list`` / ``*.txt``) of the field's h5 layout."""
    try:
        return any(p.suffix in _LIST_SUFFIXES and p.is_file() for p in root.iterdir())
    except OSError:  # unreadable: H5Dataset, the fallback, says so in one line
        return False


def open_root(root: Path) -> H5Dataset:
    """The h5 dataset in ``root``."""
    return H5Dataset(root)


def read_scan(paths: list[Path], case_id: str) -> Case:
    """One h5 file (``paths[0]``; h5 has no channel files) without its label, for ``crln predict``."""
    return read_h5_case(paths[0], case_id, with_label=False)
