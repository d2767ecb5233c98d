"""Keep large CPU tensors in the process heap instead of fresh ``mmap`` regions (glibc only).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``. A 3D
training step or a sliding-window pass allocates and frees many activation maps of 10–200 MiB, so
each one is page-faulted and zero-filled by the kernel again, every step. On the project's 2-core
CPU that kernel work was a third of the training step's wall time (``benchmarks/RESULTS.md``,
"CPU allocator"). PyTorch's performance guide suggests swapping in jemalloc or TCMalloc for this;
here the same effect comes from glibc itself, without a new dependency: ``mallopt`` turns ``mmap``
off for ordinary allocations and raises the trim threshold, so freed blocks stay in the heap and
the next step reuses them. Results are bit-identical (only where the bytes live changes); the cost
is that the process keeps its peak heap until it exits, which a training or inference process
reaches in its first iterations anyway.

Set ``CRLN_CPU_ALLOCATOR=system`` to keep the C library's defaults. Processes of a data-parallel job
(``WORLD_SIZE`` > 1, as torchrun sets it) keep them too: a 2-process gloo job on CPU aborted twice in
about fifteen runs on the development machine, both times under heavy load, with the tuned heap.
The cause is not known, so multi-process runs are left as they were until it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["ALLOCATOR_ENV", "tune_cpu_allocator"]

ALLOCATOR_ENV = "CRLN_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB of free heap

_state: str | None = None


def tune_cpu_allocator() -> str:
    """Apply the heap-reuse settings once per process; returns what is in effect.

    Returns:
        ``"tuned"`` (settings applied, now or by an earlier call), ``"system"`` (switched off by
        ``CRLN_CPU_ALLOCATOR=system``), ``"distributed"`` (a process of a job with ``WORLD_SIZE`` > 1)
        or ``"unsupported"`` (not Linux with glibc).
    """
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ALLOCATOR_ENV, "tuned").strip().lower()
    if choice == "system":
        _state = "system"
    elif _world_size() > 1:
        _state = "distributed"
    elif not sys.platform.startswith("linux"):
        _state = "unsupported"
    else:
        _state = "tuned" if _glibc_mallopt() else "unsupported"
    return _state


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _glibc_mallopt() -> bool:
    """``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``; False without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
