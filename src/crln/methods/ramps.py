"""Loss-weight ramps of the methods (the engine's learning-rate schedules are :mod:`crln.engine.schedule`)."""

from __future__ import annotations

import math

__all__ = ["sigmoid_rampup"]


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)`` (Laine & Aila, 2017); 1 if length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
