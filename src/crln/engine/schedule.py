"""Learning-rate and loss-weight schedules."""

from __future__ import annotations

import math

__all__ = ["poly_lr_factor", "sigmoid_rampup"]


def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly decay factor ``(1 - step / total_steps) ** power`` for 0-based ``step``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return max(0.0, 1.0 - step / total_steps) ** power


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)`` (Laine & Aila, 2017); 1 if length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
