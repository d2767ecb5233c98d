"""OpenMP settings that keep a crln process fair to the other processes on a shared CPU.

PyTorch's CPU kernels run in OpenMP parallel regions (GNU libgomp in the pip wheels). At the end
of each region libgomp's idle threads *spin* (busy-wait) before they sleep, in case the next region
follows at once: 300 000 rounds by default, several milliseconds. That is a good bet on a machine
of its own. When two processes share the cores, the spinning threads of one burn the time slices
the other needs, and a parallel region cannot end until its descheduled threads run again: two
``crln train`` processes on a 2-core machine went from 2.2 s per iteration alone to 25–120 s each
under extra load (issue #21); on a quiet machine two training steps at once took 3.3–3.7× as long as
one alone (``benchmarks/bench_concurrency.py``, ``benchmarks/RESULTS.md``).

The fix bounds the spin to :data:`SPIN_COUNT` rounds (``GOMP_SPINCOUNT`` for libgomp,
``KMP_BLOCKTIME`` = 1 ms for Intel's OpenMP), after which an idle thread sleeps. Measured on the
2-core machine: 10 000 rounds still left two jobs 3.2× slower each; 1000 rounds, 2.45× (the target
is 2.5×, a fair share is 2×) with the lone job within 2–7 % of the long spin. The passive policy
(``OMP_WAIT_POLICY=passive``: no spin at all) is fairer still (2.1–2.2×) but slowed the lone job by
12–14 % there (every region then pays a sleep and a wake-up).

libgomp reads its environment once, when it is loaded, which is when ``torch`` is first imported.
:func:`configure_openmp` therefore runs at the very start of the ``crln`` command, before any torch
import, and only fills in what the user has not set: an explicit ``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME`` or ``OMP_NUM_THREADS`` is left as it is (``OMP_WAIT_POLICY=active``
restores the long spin). The thread count defaults to the CPUs this process may use (its affinity
mask, and a cgroup CPU quota such as ``docker --cpus``) where that is fewer than the machine's.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["SPIN_COUNT", "THREAD_ENV", "WAIT_POLICY_ENVS", "available_cpus", "configure_openmp"]

THREAD_ENV = "OMP_NUM_THREADS"
#: Variables that choose how idle OpenMP threads wait; crln sets the last two when none is set.
WAIT_POLICY_ENVS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Spin rounds of an idle libgomp thread before it sleeps (default 300 000).
SPIN_COUNT = 1000
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cgroup_cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (rounded up)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return max(1, count)


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set a short OpenMP spin and the thread count, unless the user set them; returns what was set.

    Call it before ``torch`` is imported (libgomp reads the variables when it loads); later calls
    change nothing in a process that has torch loaded already.
    """
    chosen: dict[str, str] = {}
    if not any(name in environ for name in WAIT_POLICY_ENVS):
        chosen.update(GOMP_SPINCOUNT=str(SPIN_COUNT), KMP_BLOCKTIME="1")
    if THREAD_ENV not in environ:
        cpus = available_cpus()
        if cpus < (os.cpu_count() or cpus):  # only a quota or a mask libgomp might miss needs saying
            chosen[THREAD_ENV] = str(cpus)
    environ.update(chosen)
    return chosen
