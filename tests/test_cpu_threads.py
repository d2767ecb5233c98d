"""crln.engine.cpu_threads: OpenMP settings for a shared CPU, filled in only where the user set none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crln.engine import cpu_threads
from crln.engine.cpu_threads import SPIN_COUNT, available_cpus, configure_openmp


def test_short_spin_is_set_when_no_policy_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: os.cpu_count())
    env: dict[str, str] = {}
    assert configure_openmp(env) == {"GOMP_SPINCOUNT": str(SPIN_COUNT), "KMP_BLOCKTIME": "1"}
    assert env == {"GOMP_SPINCOUNT": str(SPIN_COUNT), "KMP_BLOCKTIME": "1"}


@pytest.mark.parametrize("given", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"])
def test_a_users_wait_policy_is_kept(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: os.cpu_count())
    env = {given: "active" if given == "OMP_WAIT_POLICY" else "5"}
    assert configure_openmp(env) == {}
    assert env == {given: "active" if given == "OMP_WAIT_POLICY" else "5"}


def test_thread_count_follows_the_cpus_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = {"OMP_WAIT_POLICY": "passive"}
    assert configure_openmp(env) == {"OMP_NUM_THREADS": "1"}
    env = {"OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": "4"}  # the user's count wins
    assert configure_openmp(env) == {} and env["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("150000 100000\n", 2),  # 1.5 CPUs, rounded up
        ("50000 100000\n", 1),  # under one CPU still gets one
        ("350000 100000\n", 4),
        ("1600000 100000\n", 8),  # a quota above the mask: the mask wins
        ("max 100000\n", 8),  # no quota
    ],
)
def test_available_cpus_honours_a_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fixed mask of 8, so the expected counts do not depend on the machine's own affinity
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert available_cpus(path) == expected
    assert available_cpus(tmp_path / "missing") == 8
