"""Data-parallel training and evaluation over several processes started by ``torchrun``.

``torchrun --nproc_per_node=N -m crln train ...`` starts N copies of ``crln``; each finds its rank
in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_from_env` joins them into one process group (NCCL on CUDA, Gloo on CPU). Without
those variables, or with ``WORLD_SIZE=1``, nothing is started and every helper here is a no-op, so
a single-process run executes exactly the code it ran before distributed support existed.

Conventions (see ``docs/distributed.md``):

- each process trains on its own disjoint share of the *global* batch (``N × per-process batch``);
- gradients of ``Method.trainable_parameters()`` are averaged by :class:`DistributedDataParallel`
  (:func:`wrap_for_data_parallel`); a method's extra optimiser steps average their own gradients
  with :func:`crln.collectives.all_reduce_mean_`;
- the EMA teacher is not broadcast: it is updated from identical student weights, and
  :func:`verify_identical` checks that at every checkpoint;
- only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from crln.collectives import all_reduce_mean_, is_distributed
from crln.errors import CrlnError

__all__ = [
    "BACKENDS",
    "MAIN_RANK",
    "all_gather_objects",
    "any_process",
    "average_batchnorm_statistics_",
    "barrier",
    "convert_sync_batchnorm",
    "gather_shards",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_main_process",
    "launched_world_size",
    "local_rank",
    "mean_across_processes",
    "process_device",
    "rank_seed",
    "resolve_backend",
    "run_on_main",
    "shard",
    "shutdown",
    "verify_identical",
    "wrap_for_data_parallel",
]

T = TypeVar("T")

BACKENDS = ("auto", "nccl", "gloo")
MAIN_RANK = 0
_FINGERPRINT_BYTES = 8  # blake2b digest size of one tensor's fingerprint
_SHOWN_MISMATCHES = 3  # tensor names quoted when ranks disagree


# --- process group ------------------------------------------------------------------------------
def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """``LOCAL_RANK`` set by torchrun: the index of this process on its node (0 when not launched by it)."""
    return _env_int("LOCAL_RANK", 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise CrlnError(f"environment variable {name}={text!r}: expected an integer (set by torchrun)") from None


def get_rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if is_distributed() else MAIN_RANK


def get_world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, the only process that writes files and prints results."""
    return get_rank() == MAIN_RANK


def process_device(name: str, option: str = "config key train.device") -> torch.device:
    """The device of this process: ``train.device`` resolved, CUDA pinned to ``cuda:LOCAL_RANK`` under torchrun.

    Raises:
        CrlnError: ``name`` picks one GPU (``cuda:1``) while torchrun starts several processes.
    """
    from crln.engine.device import resolve_device

    device = resolve_device(name, option)
    if launched_world_size() > 1 and device.type == "cuda":
        if device.index is not None and name.strip() not in ("auto", "cuda"):
            raise CrlnError(
                f"{option}: {name!r} names one GPU but torchrun starts {launched_world_size()} "
                "processes; use auto or cuda (process k uses cuda:LOCAL_RANK)"
            )
        if local_rank() >= torch.cuda.device_count():
            raise CrlnError(
                f"LOCAL_RANK={local_rank()} but this node has {torch.cuda.device_count()} GPUs; "
                "lower torchrun --nproc_per_node"
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → ``nccl`` for CUDA devices, ``gloo`` for CPU; an explicit choice is checked."""
    if backend not in BACKENDS:
        raise CrlnError(f"config key distributed.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise CrlnError(f"config key distributed.backend: nccl needs CUDA devices, got {device}; use gloo or auto")
    return backend


def init_from_env(device: torch.device, backend: str = "auto", timeout_minutes: float = 30.0) -> bool:
    """Join the process group that torchrun's environment describes; returns True when this call started it.

    A no-op when ``WORLD_SIZE`` is unset or 1, or when a group is already running (it then has to
    span ``WORLD_SIZE`` processes). The group stays up until :func:`shutdown`, so that training and
    the evaluation after it (``crln train --evaluate``) share it.
    """
    world = launched_world_size()
    if world <= 1:
        return False
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise CrlnError(f"a process group of {dist.get_world_size()} processes is running but WORLD_SIZE={world}")
        return False
    if not dist.is_available():
        raise CrlnError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise CrlnError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start several processes with "
            "torchrun --nproc_per_node=N -m crln ..."
        )
    dist.init_process_group(
        backend=resolve_backend(backend, device), timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return True


def shutdown() -> None:
    """Leave the process group, if one is running (the CLI calls this on exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of process ``rank``: ``seed`` itself on rank 0 (which so draws what a single process
    draws), an independent stream derived from ``(seed, rank)`` elsewhere (dropout, noise and CutMix
    differ between the processes' shares of the batch)."""
    if rank == MAIN_RANK:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- collectives ------------------------------------------------------------------------------
def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; Gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on at least one process (every process must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every process, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_processes(values: dict[str, float]) -> dict[str, float]:
    """Mean of each named scalar over the processes that have it (logged loss terms, window means)."""
    if not is_distributed():
        return dict(values)
    gathered = all_gather_objects(values)
    keys = list(dict.fromkeys(k for d in gathered for k in d))
    return {k: float(np.mean([d[k] for d in gathered if k in d])) for k in keys}


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result, or its :class:`CrlnError`, to every process.

    File-system decisions (does the run folder hold a run? load the checkpoint to resume) are taken
    once, so that the processes agree even when only rank 0's node sees the run folder.
    """
    if not is_distributed():
        return fn()
    payload: list[Any] = [None]
    if is_main_process():
        try:
            payload[0] = ("ok", fn())
        except CrlnError as err:
            payload[0] = ("error", str(err))
    dist.broadcast_object_list(payload, src=MAIN_RANK)
    status, value = payload[0]
    if status == "error":
        raise CrlnError(value)
    return value


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's share of ``items`` as ``(index, item)`` pairs: every ``world``-th item from ``rank``."""
    rank, world = get_rank(), get_world_size()
    return [(i, items[i]) for i in range(rank, len(items), world)]


def gather_shards(local: list[tuple[int, T]]) -> list[T]:
    """Every process's ``(index, result)`` pairs joined back into index order (see :func:`shard`)."""
    pairs = [pair for part in all_gather_objects(local) for pair in part]
    return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]


# --- model state ------------------------------------------------------------------------------
def _fingerprint(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=_FINGERPRINT_BYTES).hexdigest()


def verify_identical(named_tensors: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Check that every process holds bit-identical tensors (student, EMA teacher, DIM, μ ...).

    Compares per-tensor fingerprints rather than broadcasting the weights: the teacher follows
    identical student weights on every process, so any difference is a bug worth stopping for.

    Raises:
        CrlnError: naming the first tensors that differ from rank 0's.
    """
    if not is_distributed():
        return
    local = {name: _fingerprint(t) for name, t in named_tensors}
    gathered = all_gather_objects(local)
    reference = gathered[MAIN_RANK]
    for rank, other in enumerate(gathered):
        differing = [name for name in reference if other.get(name) != reference[name]]
        if differing or other.keys() != reference.keys():
            shown = ", ".join(differing[:_SHOWN_MISMATCHES]) or "the set of tensors"
            raise CrlnError(f"{what}: process {rank} differs from process {MAIN_RANK} in {shown}")


def average_batchnorm_statistics_(module: nn.Module) -> None:
    """Average the running mean and variance of every (non-synchronised) BatchNorm layer over the processes.

    Each process normalises its share of the batch with its own statistics; averaging the running
    estimates after each step keeps the student, and the EMA teacher that follows it, identical on
    every process (the running mean becomes exactly that of the global batch).
    """
    if not is_distributed():
        return
    stats = [
        buffer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
        for buffer in (layer.running_mean, layer.running_var)
        if buffer is not None
    ]
    all_reduce_mean_(stats)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``distributed.sync_batchnorm``: BatchNorm statistics over the global batch (torch's SyncBatchNorm).

    Raises:
        CrlnError: on CPU, where torch's SyncBatchNorm does not run.
    """
    if device.type != "cuda":
        raise CrlnError(
            "config key distributed.sync_batchnorm: torch's SyncBatchNorm runs on CUDA only, got device "
            f"{device}; set it to false (per-process statistics, running averages averaged after each step)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class _TrainStep(nn.Module):
    """Routes DDP's forward to ``method.train_step``; registers exactly the trainable parameters.

    The method is held outside the module tree, so DDP sees (broadcasts at start, averages the
    gradients of) ``method.trainable_parameters()`` only: the student and, for CRLN, its DIM,
    prototypes and CPS projection. The teacher and μ (which has its own step) stay out.
    """

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_method", method)
        self.trainable = nn.ParameterList(list(method.trainable_parameters()))  # type: ignore[attr-defined]

    def forward(self, batch: Any, step: int) -> dict[str, Tensor]:
        return self._method.train_step(batch, step)  # type: ignore[attr-defined]


def wrap_for_data_parallel(method: nn.Module, device: torch.device) -> nn.Module:
    """A DistributedDataParallel module whose ``(batch, step)`` call runs ``method.train_step``.

    The wrapped module holds no buffers, so DDP broadcasts none: BatchNorm statistics are averaged by
    :func:`average_batchnorm_statistics_` or synchronised by SyncBatchNorm instead.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_TrainStep(method), device_ids=device_ids)
