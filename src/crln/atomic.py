"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A reader never sees a half-written file, and a failed or killed write leaves the previous file
intact. Every writer of crln (checkpoints, logs' rewrites, configs, h5/NIfTI files, CSV/JSON
summaries) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from crln.errors import CrlnError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_output_dir", "check_unshared_output_dir"]


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on error delete it.

    ``suffix`` keeps the extension that writers use to pick a format (e.g. ``.nii.gz``). An
    ``OSError`` while writing (disk full, permissions) becomes a :class:`CrlnError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as err:
        raise CrlnError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        if fsync:
            _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(err, OSError):
            raise CrlnError(f"cannot write {path}: {err.strerror or err}; the previous file is kept") from err
        raise
    if fsync:
        _fsync_file(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` as a folder crln may write into; checked before any work, so a bad one costs nothing.

    The folder itself need not exist, but neither it nor any folder above it may be a file.

    Args:
        path: the output folder.
        what: the option or config key that named it (e.g. ``-o``, ``train.output_dir``), for the message.

    Raises:
        CrlnError: ``path`` or a parent of it is an existing file.
    """
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            found = "an existing file" if folder == path else f"{folder} above it is a file"
            raise CrlnError(f"{what} {path}: {found}, expected a folder to write into")
    return path


def check_unshared_output_dir(path: str | Path, what: str, expected: str = "a new or empty folder") -> Path:
    """:func:`check_output_dir`, and the folder, where it exists, empty: a command that writes a whole
    dataset (its case lists included) must not mix its files into another dataset's folder.

    Raises:
        CrlnError: as :func:`check_output_dir`, or the folder holds files (the first three named).
    """
    path = check_output_dir(path, what)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise CrlnError(f"{what} {path}: holds {shown}, expected {expected}")
    return path
