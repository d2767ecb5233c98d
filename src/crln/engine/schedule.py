"""Learning-rate schedules of the engine (loss-weight ramps belong to the methods: :mod:`crln.methods.ramps`)."""

from __future__ import annotations

from collections.abc import Sequence

from crln.config import LR_SCHEDULES

__all__ = ["LR_SCHEDULES", "lr_factor", "poly_lr_factor", "schedule_window", "step_lr_factor"]


def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly decay factor ``(1 - step / total_steps) ** power`` for 0-based ``step``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return max(0.0, 1.0 - step / total_steps) ** power


def step_lr_factor(step: int, step_size: int, gamma: float) -> float:
    """Step decay ``gamma ** (step // step_size)`` for 0-based ``step`` (UA-MT's ÷10 every 2,500 iterations)."""
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return gamma ** (step // step_size)


def lr_factor(step: int, total_steps: int, schedule: str, *, power: float, step_size: int, gamma: float) -> float:
    """The multiplier of the base learning rate at 0-based ``step`` for ``schedule`` (one of ``LR_SCHEDULES``)."""
    if schedule == "poly":
        return poly_lr_factor(step, total_steps, power)
    if schedule == "step":
        return step_lr_factor(step, step_size, gamma)
    raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def schedule_window(step: int, total: int, restarts: Sequence[int]) -> tuple[int, int]:
    """``(step within its stage, stage length)`` for a schedule that starts again at each of ``restarts``.

    The stage of 0-based ``step`` runs from the last restart ≤ ``step`` (0 if none) to the next
    restart (``total`` if none); with no restarts this is ``(step, total)``.
    """
    begin = max((r for r in restarts if r <= step), default=0)
    end = min((r for r in restarts if r > step), default=total)
    return step - begin, end - begin
