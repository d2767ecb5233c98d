"""The files of an evaluation, written and read here: ``per_case.csv`` and ``summary.json``.

``crln evaluate`` writes them (:mod:`crln.evaluation`); ``crln report`` and ``crln bench`` read them.
``per_case.csv`` has a ``case`` column, one column per metric key of :func:`crln.metrics.case_metrics`
and ``seconds``; ``summary.json`` holds :func:`crln.metrics.summarize`'s statistics under ``metrics``
(``null`` where a statistic is undefined, e.g. a 95HD over no defined case) and the evaluation's settings.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from crln.atomic import atomic_write_text

__all__ = ["read_per_case", "write_per_case", "write_summary"]


def write_per_case(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write the per-case rows (floats with 6 decimals, columns in the first row's order)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def read_per_case(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``per_case.csv``: ``case`` as text, every other column as a float (``NaN`` when
    empty or not a number)."""
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {"case": row.get("case", "")}
            for k, v in row.items():
                if k == "case":
                    continue
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    parsed[k] = float("nan")
            rows.append(parsed)
    return rows


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined distance's ``NaN``) replaced by None, recursively.

    ``json.dumps`` writes floats itself, as the bare token ``NaN`` that strict JSON readers refuse, so
    they must be replaced before it sees them; numpy scalars become Python numbers on the way.
    """
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Atomically write ``summary.json``: indented, strict JSON (an undefined statistic, ``NaN``, is ``null``)."""
    atomic_write_text(path, json.dumps(_finite_or_none(summary), indent=2, allow_nan=False) + "\n")
