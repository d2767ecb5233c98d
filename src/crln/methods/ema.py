"""Exponential moving average of a student network (the mean teacher)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay_at", "ema_update"]


def ema_decay_at(step: int, decay: float) -> float:
    """Decay used after optimiser step ``step`` (0-based): ``min(1 - 1/(step + 1), decay)``.

    The warm-up lets the teacher follow the student closely in the first iterations, as in the
    mean-teacher reference implementation (Tarvainen & Valpola, 2017) and the field's scripts.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher ← decay · teacher + (1 − decay) · student`` for parameters and float buffers.

    Float buffers (BatchNorm running statistics) are averaged like parameters; integer buffers
    (``num_batches_tracked``) are copied. Both modules must have the same architecture.
    """
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)
