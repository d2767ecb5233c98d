"""crln.engine.allocator: heap reuse for large CPU tensors (glibc)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from crln.engine import allocator

_PAGE_FAULTS = textwrap.dedent(
    """
    import os, resource, sys
    import torch
    from crln.engine.allocator import tune_cpu_allocator
    print(tune_cpu_allocator())
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(64 * 2**20 // 4)  # a 64 MiB activation map, written once, then freed
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_step()
    print(faults_of_one_step())
    """
)


def _second_step_faults(mode: str) -> tuple[str, int]:
    env = {"CRLN_CPU_ALLOCATOR": mode, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_tuned_heap_reuses_freed_blocks_without_page_faults() -> None:
    state, tuned = _second_step_faults("tuned")
    if state == "unsupported":
        pytest.skip("this C library has no mallopt")
    system_state, system = _second_step_faults("system")
    assert (state, system_state) == ("tuned", "system")
    pages = 64 * 2**20 // 4096
    # The C library's default maps a fresh region for the second tensor: one fault per page.
    assert system >= pages // 2
    # Tuned: the freed block is reused, already mapped.
    assert tuned < pages // 20


def test_switch_off_and_idempotence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "system")
    assert allocator.tune_cpu_allocator() == "system"
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "tuned")
    assert allocator.tune_cpu_allocator() == "system"  # decided once per process
