"""Versioned checkpoints: atomic writes and safe (weights-only) loading.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
``torch.load(weights_only=True)`` and a crafted pickle cannot execute code. It holds everything
needed to resume a run exactly and to rebuild the networks for inference without the run folder:

``format_version``, ``crln_version``, ``method`` (name), ``config`` (resolved, plain dict),
``step`` (completed iterations), ``method_state`` (student, teacher, extra modules),
``optimizer``, ``scaler``, ``torch_rng``, ``best`` (``{"metric", "step"}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crln import __version__
from crln.atomic import atomic_path
from crln.errors import CrlnError

__all__ = ["FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "method", "config", "step", "method_state")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict (``format_version`` and ``crln_version`` are added)."""
    payload = {"format_version": FORMAT_VERSION, "crln_version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint without unpickling arbitrary objects.

    Raises:
        CrlnError: missing, unreadable or non-checkpoint file, an object a weights-only load refuses,
            or a format version this crln does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise CrlnError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CrlnError(f"checkpoint {path}: not a loadable crln checkpoint ({reason[:200]})") from err
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CrlnError(f"checkpoint {path}: expected keys {list(_REQUIRED_KEYS)}, found {found}")
    if state["format_version"] != FORMAT_VERSION:
        raise CrlnError(
            f"checkpoint {path}: format version {state['format_version']}, this crln reads {FORMAT_VERSION}"
        )
    return state
