"""In-place collectives over the processes of a ``torchrun`` job, used by the methods and the engine.

They live outside :mod:`crln.engine` so that a method (CRLN's μ gradient, the CPS prototype sums)
can average over processes without importing the engine: methods never import the engine. Every
helper is a no-op in a single process. Joining and leaving the process group is
:mod:`crln.engine.distributed`'s work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean_", "all_reduce_sum_", "is_distributed"]


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_(tensors: Sequence[Tensor], op: Any, divide: bool) -> None:
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for group in by_dtype.values():
        # One collective per dtype and device: many small tensors (gradients of μ, BN statistics).
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=op)
        if divide:
            flat.div_(world)
        offset = 0
        for t in group:
            t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the processes (a no-op in a single process)."""
    if is_distributed() and tensors:
        _reduce_(tensors, dist.ReduceOp.SUM, divide=True)


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor, in place, by its sum over the processes (a no-op in a single process)."""
    if is_distributed() and tensors:
        _reduce_(tensors, dist.ReduceOp.SUM, divide=False)
