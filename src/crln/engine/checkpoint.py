"""Versioned checkpoints: atomic writes and safe (weights-only) loading.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
``torch.load(weights_only=True)`` and a crafted pickle cannot execute code. It holds everything
needed to resume a run exactly and to rebuild the networks for inference without the run folder:

``format_version``, ``crln_version``, ``method`` (name), ``config`` (resolved, plain dict),
``step`` (completed iterations), ``method_state`` (student, teacher, extra modules),
``optimizer``, ``scaler``, ``torch_rng``, ``best`` (``{"metric", "step"}``).

An inference-weights file (``model_final.pt``) has the same required keys, ``contents`` =
:data:`INFERENCE_WEIGHTS`, and in ``method_state`` the inference network's weights only.
"""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crln import __version__
from crln.atomic import atomic_path
from crln.errors import CrlnError

__all__ = ["FORMAT_VERSION", "INFERENCE_WEIGHTS", "load_checkpoint", "restore_module_state", "save_checkpoint"]

FORMAT_VERSION = 1
#: ``contents`` of a checkpoint that holds only the inference network's weights (not resumable).
INFERENCE_WEIGHTS = "inference_network"
_REQUIRED_KEYS = ("format_version", "method", "config", "step", "method_state")
# Types of the required entries, checked before anything is rebuilt from them.
_REQUIRED_TYPES = {"method": str, "config": dict, "step": int, "method_state": dict}
_MAX_REASON_CHARS = 200
_BYTES_PER_MIB = 2**20


# What other files commonly mistaken for a checkpoint start with (a checkpoint is a zip archive or a pickle).
_SIGNATURES = (
    (b"\x1f\x8b", "a gzip file, e.g. a .nii.gz scan"),
    (b"\x89HDF", "an HDF5 file, e.g. an .h5 case"),
    ((348).to_bytes(4, "little"), "a NIfTI file"),
    ((348).to_bytes(4, "big"), "a NIfTI file"),
)
_CHECKPOINT_STARTS = (b"PK", b"\x80")  # torch's zip format; a bare (legacy) pickle of protocol >= 2


def _first_line(err: BaseException) -> str:
    """The first line of ``err``; only its first sentence when it is longer than the limit."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else err.__class__.__name__
    if len(line) <= _MAX_REASON_CHARS:
        return line
    head = line[:_MAX_REASON_CHARS]
    end = head.find(". ")
    return head[: end + 1] if end > 0 else head.rstrip() + " …"


def _check_signature(path: Path) -> None:
    """Refuse a file that is plainly no checkpoint (empty, a scan, an h5 case) before torch reads it."""
    with path.open("rb") as handle:
        start = handle.read(4)
    if not start:
        raise CrlnError(f"checkpoint {path}: file is empty (0 bytes), expected a .pt file written by crln train")
    if start.startswith(_CHECKPOINT_STARTS):
        return
    found = next((what for magic, what in _SIGNATURES if start.startswith(magic)), "neither a zip archive nor a pickle")
    raise CrlnError(f"checkpoint {path}: not a crln checkpoint ({found}), expected a .pt file written by crln train")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict (``format_version`` and ``crln_version`` are added).

    Raises:
        CrlnError: the file cannot be written (e.g. a full disk); the previous file is kept.
    """
    payload = {"format_version": FORMAT_VERSION, "crln_version": __version__, **state}
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a failed write (a full disk, a file-size limit) as a
            # RuntimeError ("unexpected pos ..."); make it the OSError that atomic_path reports.
            free_mib = shutil.disk_usage(tmp.parent).free / _BYTES_PER_MIB
            reason = f"write failed with {free_mib:.1f} MiB free on its disk ({_first_line(err)})"
            raise OSError(errno.EIO, reason) from err


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
        _check_signature(path)
    except OSError as err:
        raise CrlnError(f"checkpoint {path}: cannot read ({err.strerror or err})") from err
    try:
        with warnings.catch_warnings():
            # A foreign pickle makes torch warn before it refuses; the refusal below is the one message.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        # A refused pickle: torch's first line is a general notice; the line naming the object says why.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = next((line for line in lines if "unsupported" in line.lower()), None)
        if refused is not None:
            raise CrlnError(
                f"checkpoint {path}: not a loadable crln checkpoint, it holds objects that a weights-only load "
                f"refuses to run ({refused[:_MAX_REASON_CHARS]})"
            ) from err
        reason = _first_line(err)
        if "zip archive" in reason:
            reason = f"truncated or corrupt: {reason}"
        raise CrlnError(f"checkpoint {path}: not a loadable crln checkpoint ({reason})") from err
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CrlnError(f"checkpoint {path}: expected keys {list(_REQUIRED_KEYS)}, found {found}")
    if state["format_version"] != FORMAT_VERSION:
        raise CrlnError(
            f"checkpoint {path}: format version {state['format_version']}, this crln reads {FORMAT_VERSION}"
        )
    for key, expected in _REQUIRED_TYPES.items():
        if not isinstance(state[key], expected) or isinstance(state[key], bool):
            raise CrlnError(
                f"checkpoint {path}: key {key!r} is a {type(state[key]).__name__}, expected a {expected.__name__}"
            )
    method_section = state["config"].get("method")
    if isinstance(method_section, dict) and method_section.get("name", state["method"]) != state["method"]:
        raise CrlnError(
            f"checkpoint {path}: method {state['method']!r} but its config says "
            f"method.name={method_section['name']!r}, expected the same method"
        )
    return state


def restore_module_state(module: nn.Module, state_dict: dict[str, Any], path: str | Path | None = None) -> None:
    """``module.load_state_dict(state_dict)`` (strict), refusing a mismatch with one clear line.

    Args:
        module: the freshly built method or network.
        state_dict: the checkpoint's ``method_state``.
        path: the checkpoint file, named in the error (callers that add it themselves pass None).

    Raises:
        CrlnError: missing or unexpected entries, or tensors whose shapes differ from the architecture
            the config builds (e.g. another ``model.n_filters`` or ``data.num_classes``).
    """
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as err:
        # torch's first line only says "Error(s) in loading state_dict for X:"; the next names the entry.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = (lines[1] if len(lines) > 1 else lines[0] if lines else err.__class__.__name__)[:_MAX_REASON_CHARS]
        where = f"checkpoint {path}: " if path is not None else ""
        raise CrlnError(f"{where}weights do not match the architecture of its config ({reason})") from err
