"""crln.engine.allocator: heap reuse for large CPU tensors (glibc)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from crln.engine import allocator

_WHERE_IS_A_LARGE_TENSOR = textwrap.dedent(
    """
    import torch
    from crln.engine.allocator import tune_cpu_allocator
    print(tune_cpu_allocator())
    x = torch.empty(2, 16, 64, 64, 48)  # a 50 MiB activation map, above glibc's largest mmap threshold
    address = x.data_ptr()
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            print(start <= address < end)
            break
    else:
        print(False)
    """
)


def _placement(mode: str, world_size: str = "1") -> tuple[str, bool]:
    """(allocator state, whether a 50 MiB tensor lives in the brk heap) in a fresh process."""
    env = {"CRLN_CPU_ALLOCATOR": mode, "WORLD_SIZE": world_size, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _WHERE_IS_A_LARGE_TENSOR], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], out[1] == "True"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and /proc/self/maps are Linux/glibc")
def test_tuned_heap_keeps_large_tensors_in_the_reusable_heap() -> None:
    state, in_heap = _placement("tuned")
    if state == "unsupported":
        pytest.skip("this C library has no mallopt")
    assert (state, in_heap) == ("tuned", True)
    # The C library's default gives such a block its own mmap, returned to the kernel on free.
    assert _placement("system") == ("system", False)


@pytest.mark.slow
def test_data_parallel_processes_keep_the_system_allocator() -> None:
    assert _placement("tuned", world_size="2") == ("distributed", False)


def test_switch_off_and_idempotence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "system")
    assert allocator.tune_cpu_allocator() == "system"
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "tuned")
    assert allocator.tune_cpu_allocator() == "system"  # decided once per process
