"""Resource bounds: the decoded-case cache never exceeds its limit (LRU), and sliding-window inference
on a large volume needs the output volume plus memory bounded by the window batch, not more.

Peak RSS of whole training runs and of inference on real volumes is measured in ``benchmarks/``
(issue #6); these tests pin the two bounds that the code promises.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crln.data import h5 as h5_module
from crln.data.h5 import H5Dataset, clear_h5_cache, h5_cache_bytes, set_h5_cache_limit, write_h5_case
from crln.inference import sliding_window_predict

# ----------------------------------------------------------------------------------------------------------
# decoded-case cache

CACHE_SHAPES = {"a": (4, 4, 4), "b": (8, 8, 4), "c": (8, 8, 8), "d": (16, 8, 8), "e": (16, 16, 8)}
BYTES_PER_VOXEL = 4 + 1  # float32 image + uint8 label


def _case_bytes(case_id: str) -> int:
    return math.prod(CACHE_SHAPES[case_id]) * BYTES_PER_VOXEL


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    for case_id, shape in CACHE_SHAPES.items():
        write_h5_case(root / f"{case_id}.h5", np.ones(shape, np.float32), np.zeros(shape, np.uint8), compression=None)
    (root / "train.list").write_text("".join(f"{case_id}\n" for case_id in CACHE_SHAPES))
    return root


@pytest.fixture
def restored_cache_limit() -> Iterator[None]:
    previous = h5_module._CACHE_LIMIT
    yield
    set_h5_cache_limit(previous)
    clear_h5_cache()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(0, sum(_case_bytes(c) for c in CACHE_SHAPES)),
    accesses=st.lists(st.sampled_from(sorted(CACHE_SHAPES)), min_size=1, max_size=25),
)
def test_cache_stays_under_its_limit_and_evicts_least_recently_used(
    cache_root: Path, restored_cache_limit: None, limit: int, accesses: list[str]
) -> None:
    clear_h5_cache()
    set_h5_cache_limit(limit)
    dataset = H5Dataset(cache_root)
    model: OrderedDict[str, int] = OrderedDict()  # the documented policy, as a reference
    for case_id in accesses:
        dataset.load(case_id)
        model[case_id] = _case_bytes(case_id)
        model.move_to_end(case_id)
        while model and sum(model.values()) > limit:
            model.popitem(last=False)
        assert h5_cache_bytes() == sum(model.values()) <= limit
    last = accesses[-1]
    cached = dataset.load(last).image is dataset.load(last).image
    assert cached == (_case_bytes(last) <= limit)


@pytest.mark.slow
def test_cache_limit_from_the_environment(cache_root: Path) -> None:
    limit = _case_bytes("c")
    script = (
        "import sys\n"
        "from crln.data.h5 import H5Dataset, h5_cache_bytes\n"
        "dataset = H5Dataset(sys.argv[1])\n"
        "for case_id in ('a', 'b', 'c', 'd', 'e', 'c'):\n"
        "    dataset.load(case_id)\n"
        "print(h5_cache_bytes())\n"
    )
    env = {**os.environ, "CRLN_CACHE_BYTES": str(limit), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cache_root)], capture_output=True, text=True, env=env, check=True
    )
    assert int(proc.stdout.split()[-1]) == _case_bytes("c")  # 'e' is too big alone; 'c' evicted the rest


# ----------------------------------------------------------------------------------------------------------
# sliding-window inference on a large volume

LARGE_VOLUME = (512, 512, 300)  # ~300 MiB of float32, a big CT
PATCH = (128, 128, 150)
SW_BATCH = 1
NUM_CLASSES = 2
# On the output device the result needs the probabilities and MONAI's overlap-count map.
OUTPUT_VOLUMES = NUM_CLASSES + 1
# The working set of one batch of windows, in multiples of (input + logits) of that batch: about 7x on
# CPU as measured on cpu2 (transients and allocator slack); on CUDA the live tensors of a batch (window,
# logits, probabilities) come to about 2x by count, not yet measured. The bounds leave headroom.
CPU_WINDOW_BATCH_ALLOWANCE = 10
CUDA_WINDOW_BATCH_ALLOWANCE = 4
CPU_FIXED_SLACK_BYTES = 64 * 2**20
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _window_batch_bytes() -> int:
    return SW_BATCH * (1 + NUM_CLASSES) * math.prod(PATCH) * np.dtype(np.float32).itemsize


def _peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", PROC_STATUS.read_text()).group(1)) * 1024


class _RecordingModel(torch.nn.Module):
    """A 1x1x1 convolution that remembers the largest batch of windows it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, NUM_CLASSES, kernel_size=1)
        self.largest_input: tuple[int, ...] = ()

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.numel() > math.prod(self.largest_input or (0,)):
            self.largest_input = tuple(windows.shape)
        return self.conv(windows)


@pytest.mark.skipif(not PROC_CLEAR_REFS.exists(), reason="peak RSS is reset through Linux's /proc/self/clear_refs")
def test_large_volume_on_cpu_needs_the_output_plus_a_window_batch() -> None:
    """The most expensive test of the robustness suite: about 5 s and 1.1 GB on 2 CPU cores."""
    model = _RecordingModel().eval()
    image = np.zeros(LARGE_VOLUME, np.float32)
    image.fill(0.0)  # touch every page, so that the input is part of the baseline
    PROC_CLEAR_REFS.write_text("5")  # peak RSS := current RSS
    baseline = _peak_rss()
    probs = sliding_window_predict(
        model, image, patch_size=PATCH, stride=PATCH, num_classes=NUM_CLASSES, sw_batch_size=SW_BATCH
    )
    growth = _peak_rss() - baseline
    assert probs.shape == (NUM_CLASSES, *LARGE_VOLUME)
    assert model.largest_input == (SW_BATCH, 1, *PATCH)
    bound = OUTPUT_VOLUMES * image.nbytes + CPU_WINDOW_BATCH_ALLOWANCE * _window_batch_bytes() + CPU_FIXED_SLACK_BYTES
    assert growth <= bound, f"peak RSS grew by {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_volume_on_cuda_keeps_only_a_window_batch_on_the_device() -> None:
    device = torch.device("cuda")
    model = _RecordingModel().to(device).eval()
    image = np.zeros(LARGE_VOLUME, np.float32)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    probs = sliding_window_predict(
        model, image, patch_size=PATCH, stride=PATCH, num_classes=NUM_CLASSES, sw_batch_size=SW_BATCH, device=device
    )
    growth = torch.cuda.max_memory_allocated(device) - baseline
    assert probs.device.type == "cpu" and probs.shape == (NUM_CLASSES, *LARGE_VOLUME)
    # The bound is a few window batches, far below even the input volume: neither the input nor the
    # output volume may live on the device.
    bound = CUDA_WINDOW_BATCH_ALLOWANCE * _window_batch_bytes()
    # windows did reach the device (a run that silently stayed on the CPU would grow by 0 and pass the bound)
    assert growth > 0
    assert growth <= bound, f"device memory grew by {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
