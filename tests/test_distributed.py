"""Data-parallel training: 2 CPU processes (gloo) on phantoms against one process with the same global batch.

How the comparison with one process is made meaningful (``ARRANGED``):

- the data are the same by construction: each process takes its share of the global batch with the
  global slot numbers, so crops, rot/flip and the data noise (all drawn from ``(seed, step, slot)``)
  are those of the single process; they stay ON in the comparison;
- torch's random draws (dropout, the strong view's noise and CutMix boxes, CPS sampling) cannot
  match, since each process draws for its own share: they are switched off (dropout 0, strong noise
  0, CutMix and CPS off);
- terms that are not a mean over samples differ by design (BatchNorm's batch statistics, Dice summed
  over the batch): the comparison uses group normalisation (per sample; instance normalisation is
  per sample too, but so ill-conditioned on the 2×2×2 bottleneck of a 32³ patch that float32 rounding
  alone moves its gradients by ~1%) and the cross-entropy alone, a mean over samples, so that the
  averaged gradients equal the global batch's gradient.

What is left is float summation order, so the loss trajectories agree to ``LOSS_RTOL``. The
identical-weights check runs also with everything random and batch-dependent switched on (``CRLN_FULL``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import InterruptAt, tiny_overrides
from crln.collectives import all_reduce_mean_
from crln.config import load_config
from crln.data.loader import TwoStreamBatchSampler
from crln.engine import distributed
from crln.engine.checkpoint import load_checkpoint
from crln.engine.run_folder import read_log
from crln.engine.trainer import train
from crln.errors import CrlnError

WORLD = 2
STEPS = 4
# Observed: about 3e-5 relative at step 4 (float summation order, amplified by lr 0.1); a wrong gradient
# average, share or seed is off by more than 1e-2 from the second step on.
LOSS_RTOL = 1e-3
WEIGHT_RTOL = 1e-3  # norm of the difference of all weights, relative to their norm
PER_PROCESS = {"data.labeled_batch_size": 1, "data.unlabeled_batch_size": 1}
GLOBAL = {"data.labeled_batch_size": WORLD, "data.unlabeled_batch_size": WORLD}
COMMON = {
    "train.iterations": STEPS,
    "train.log_every": 1,
    "train.checkpoint_every": STEPS // 2,
    "train.val_every": 1,  # validation (split between the processes) and best-checkpoint choice every step
    "train.device": "cpu",
    "data.validation": 2,  # one validation case per process
    "data.noise_sigma": 0.05,
    "optim.lr": 0.1,
}
ARRANGED = {
    "model.normalization": "groupnorm",
    "model.dropout": 0.0,
    "method.dice_weight": 0.0,
    "method.ce_weight": 1.0,
}
CRLN = {
    "method.name": "crln",
    "method.rectify_start": 2,  # rectified pseudo-labels and μ steps within the run
    "method.num_prototypes": 4,
    "method.mu_lr": 0.05,
    "method.mu_init": 0.5,  # inside [0, 1], where its steps are not clamped away
    "method.confidence_threshold": 0.55,  # reliable pseudo-labels already in the first iterations
    "method.tau_w": 0.5,
}
CRLN_ARRANGED = {**ARRANGED, **CRLN, "method.strong_noise_sigma": 0.0, "method.cutmix": "false", "method.cps": "false"}
CRLN_FULL = {**CRLN, "model.dropout": 0.2, "data.unlabeled_batch_size": 2, "method.num_anchors": 32}
RESUME = {"model.dropout": 0.2, "train.iterations": 4, "train.checkpoint_every": 2, "data.validation": 0}

# name -> overrides of the 2-process run (per-process batches); the 1-process references use GLOBAL instead.
JOBS = {
    "supervised": {**COMMON, **ARRANGED, **PER_PROCESS},
    "crln": {**COMMON, **CRLN_ARRANGED, **PER_PROCESS},
    "crln_full": {**COMMON, **PER_PROCESS, **CRLN_FULL},
}


def _overrides(root: Path, out: Path, tag: str, values: dict[str, object]) -> list[str]:
    return tiny_overrides(root, out, **{**values, "train.tag": tag})


def _worker(rank: int, port: int, root: Path, out: Path) -> None:
    """One of the WORLD processes, as torchrun would start it (same environment variables)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)

    def save(name: str, method: torch.nn.Module) -> None:
        torch.save({k: v.detach().cpu() for k, v in method.state_dict().items()}, out / f"{name}.rank{rank}.pt")

    try:
        for name, values in JOBS.items():
            result = train(load_config("demo", _overrides(root, out, name, values)), progress=False)
            save(name, result.method)
        # Exact resume per process: 4 iterations straight vs 2 + interrupt + resume (dropout and noise on).
        straight = load_config("demo", _overrides(root, out, "straight", {**PER_PROCESS, **RESUME}))
        save("straight", train(straight, progress=False).method)
        resumed = load_config("demo", _overrides(root, out, "resumed", {**PER_PROCESS, **RESUME}))
        with contextlib.suppress(KeyboardInterrupt):
            train(resumed, progress=False, callbacks=[InterruptAt(2)])  # killed when iteration 3 starts
        save("resumed", train(resumed, resume=True, progress=False).method)
        # The weight check itself must be able to fail.
        try:
            distributed.verify_identical([("probe", torch.full((3,), float(rank)))], "probe")
            verdict = "passed"
        except CrlnError as err:
            verdict = str(err)
        (out / f"verify.rank{rank}.txt").write_text(verdict)
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 2-process job, run once in one pair of spawned processes; returns their output folder."""
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("ddp")
        try:
            mp.spawn(_worker, args=(_free_port(), phantom_root, out), nprocs=WORLD, join=True)
            return out
        except mp.ProcessExitedException as err:
            # About one full-suite run in seven, a rank dies with SIGABRT ("terminate called without an active
            # exception", from a C++ thread of torch's CPU process-group path; cause not yet found, see
            # docs/distributed.md). Once is retried in fresh folders, visibly; twice, or any other death, fails.
            if attempt == 2 or err.signal_name != "SIGABRT":
                raise
            warnings.warn(f"2-process job aborted ({err}); retried once in fresh folders", stacklevel=1)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def one_process(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process references of the arranged jobs, with the global batch sizes."""
    out = tmp_path_factory.mktemp("single")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only spins (5x the CPU time on a loaded machine)
    try:
        for name in ("supervised", "crln"):
            values = {**JOBS[name], **GLOBAL}
            runs[name] = train(load_config("demo", _overrides(phantom_root, out, name, values)), progress=False).run_dir
    finally:
        torch.set_num_threads(threads)
    return runs


def _run_dir(out: Path, name: str, method: str) -> Path:
    return out / "phantom" / f"{method}__vnet__{name}" / "seed1337"


def _load(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.rank{rank}.pt", weights_only=True)


# --- the sampler: disjoint shares of the global batch, a pure function of (seed, step, rank) ------------
@pytest.mark.parametrize("world", [2, 3])
def test_process_shares_partition_the_global_batch(world: int) -> None:
    labeled, unlabeled, bl, bu, steps = range(5), range(5, 12), 2, 1, 9
    single = TwoStreamBatchSampler(labeled, unlabeled, bl * world, bu * world, seed=3, num_steps=steps)
    shares = [
        TwoStreamBatchSampler(labeled, unlabeled, bl, bu, seed=3, num_steps=steps, rank=r, world_size=world)
        for r in range(world)
    ]
    for step in range(steps):
        keys = [share.keys(step) for share in shares]
        slots = [k[1] for part in keys for k in part]
        assert len(slots) == len(set(slots)), "shares overlap"
        assert sorted(k for part in keys for k in part) == sorted(single.keys(step))  # same cases, same slots
        assert all(sum(k[3] for k in part) == bl and len(part) == bl + bu for part in keys)
    # Resume: a sampler started at step 4 yields the same keys as the straight one, on every rank.
    for r, share in enumerate(shares):
        late = TwoStreamBatchSampler(
            labeled, unlabeled, bl, bu, seed=3, start_step=4, num_steps=steps, rank=r, world_size=world
        )
        assert list(late) == [share.keys(s) for s in range(4, steps)]


def test_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(CrlnError, match="rank = 2, world_size = 2"):
        TwoStreamBatchSampler(range(2), range(2, 4), 1, 1, seed=0, num_steps=1, rank=2, world_size=2)


def test_single_process_helpers_are_no_ops() -> None:
    tensor = torch.arange(3.0)
    all_reduce_mean_([tensor])
    assert torch.equal(tensor, torch.arange(3.0))
    assert distributed.shard(["a", "b", "c"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert distributed.gather_shards([(1, "b"), (0, "a")]) == ["a", "b"]
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed(7, 1) != distributed.rank_seed(7, 2)
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(CrlnError, match=r"distributed\.backend: nccl needs CUDA"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(CrlnError, match=r"distributed\.sync_batchnorm: .*CUDA only"):
        distributed.convert_sync_batchnorm(torch.nn.BatchNorm3d(2), torch.device("cpu"))


# --- 2 processes ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(JOBS))
def test_every_process_holds_identical_student_and_teacher(two_processes: Path, name: str) -> None:
    a, b = _load(two_processes, name, 0), _load(two_processes, name, 1)
    assert a.keys() == b.keys()
    expected = (
        {"student"} if name == "supervised" else {"student", "teacher", "student_dim", "teacher_dim", "rectifier"}
    )
    assert expected <= {k.split(".")[0] for k in a}
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["supervised", "crln"])
def test_loss_trajectory_matches_one_process_with_the_global_batch(
    two_processes: Path, one_process: dict[str, Path], name: str
) -> None:
    method = "crln" if name == "crln" else "supervised"
    multi = read_log(_run_dir(two_processes, name, method) / "log.jsonl")
    single = read_log(one_process[name] / "log.jsonl")
    losses = [(m, s) for m, s in zip(multi, single, strict=True) if "loss" in s]
    assert [m["step"] for m, _ in losses] == list(range(1, STEPS + 1)), "rank 0 logs every step once"
    for m, s in losses:
        for term in ("loss", "loss_ce", "loss_unsup", "reliable_fraction", "loss_dim", "loss_rect", "mu"):
            if term in s:
                assert m[term] == pytest.approx(s[term], rel=LOSS_RTOL, abs=1e-7), (m["step"], term)
    assert abs(losses[-1][1]["loss"] - losses[0][1]["loss"]) > 100 * LOSS_RTOL * losses[0][1]["loss"], "no training"
    val_multi = [r["val_dice"] for r in multi if "val_dice" in r]
    val_single = [r["val_dice"] for r in single if "val_dice" in r]
    # The 2 validation cases were split between the processes; the mean covers both (a voxel may flip).
    assert len(val_single) == STEPS and any(v > 0 for v in val_single)
    assert val_multi == pytest.approx(val_single, abs=5e-3)
    weights_multi = _load(two_processes, name, 0)
    weights_single = load_checkpoint(one_process[name] / "checkpoint_final.pt")["method_state"]
    keys = [k for k, v in weights_single.items() if v.is_floating_point()]
    single_vector = torch.cat([weights_single[k].reshape(-1) for k in keys])
    multi_vector = torch.cat([weights_multi[k].reshape(-1) for k in keys])
    relative = float((multi_vector - single_vector).norm() / single_vector.norm())
    assert relative <= WEIGHT_RTOL, relative


@pytest.mark.slow
def test_only_rank_zero_writes_and_checkpoints_keep_every_rng(two_processes: Path) -> None:
    run = _run_dir(two_processes, "crln_full", "crln")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "global_labeled_batch_size": 2,
        "global_unlabeled_batch_size": 4,
    }
    steps = [r["step"] for r in read_log(run / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    state = load_checkpoint(run / "checkpoint_final.pt")
    assert state["world_size"] == WORLD
    rngs = state["torch_rng_per_rank"]
    assert len(rngs) == WORLD and not torch.equal(rngs[0], rngs[1]), "each process draws its own stream"


@pytest.mark.slow
def test_resume_is_exact_on_every_process(two_processes: Path) -> None:
    for rank in range(WORLD):
        straight, resumed = _load(two_processes, "straight", rank), _load(two_processes, "resumed", rank)
        different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
        assert not different, (rank, different[:5])


@pytest.mark.slow
def test_weight_check_detects_a_difference(two_processes: Path) -> None:
    for rank in range(WORLD):
        verdict = (two_processes / f"verify.rank{rank}.txt").read_text()
        assert verdict == "probe: process 1 differs from process 0 in probe"


@pytest.mark.slow
def test_torchrun_trains_and_evaluates(phantom_root: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m crln train ... --evaluate``: one run folder, one evaluation, one report."""
    overrides = tiny_overrides(phantom_root, tmp_path, **{**PER_PROCESS, "train.iterations": 2, "train.device": "cpu"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "crln", "train", "demo", *overrides, "--evaluate", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("| dice |") == 1, proc.stdout
    run = _run_dir(tmp_path, "demo", "supervised")
    with (run / "eval" / "per_case.csv").open() as handle:
        cases = [row["case"] for row in csv.DictReader(handle)]
    assert sorted(cases) == ["case_008", "case_009"]  # each test case scored once, by one of the processes
    assert json.loads((run / "eval" / "summary.json").read_text())["processes"] == WORLD
