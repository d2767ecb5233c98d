"""The run folder: one self-contained directory per training run.

Layout (nnU-Net style): ``<output_dir>/<dataset>/<method>__<model>__<tag>/seed<k>/`` holding
``config.yaml`` (resolved), ``meta.json`` (versions, git commit, host, command, data scale),
``log.jsonl`` (one JSON object per logged iteration or validation), ``checkpoint_{latest,best,final}.pt``
(full, resumable), ``model_final.pt`` (the inference network's weights only, to share),
``CHECKPOINTS.txt`` (which file is which) and ``eval/`` (``per_case.csv``, ``summary.json``).
Everything ``evaluate``, ``predict`` and ``report`` need is in it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from crln import __version__
from crln.atomic import atomic_write_text
from crln.config import RunConfig, config_to_dict
from crln.errors import CrlnError

__all__ = ["MetricsLog", "RunFolder", "case_lists_sha256", "git_commit", "read_log"]

CHECKPOINT_NAMES = ("latest", "best", "final")
INFERENCE_WEIGHTS_NAME = "model_final.pt"
_CHECKPOINT_NOTES = f"""Checkpoints of this run
checkpoint_latest.pt  full state of the last saved iteration (all networks, optimiser, RNG): crln train --resume
checkpoint_best.pt    full state at the best validation Dice (only with data.validation > 0)
checkpoint_final.pt   full state at the end of training: crln evaluate / predict / report use it
{INFERENCE_WEIGHTS_NAME}        the inference network's weights and the config only, at the end of training:
                      the file to share; crln evaluate and crln predict accept it, and use it (with crln report)
                      in a folder without checkpoint_final.pt and checkpoint_latest.pt; training cannot resume from it
"""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the crln source tree, with ``+dirty`` when it has uncommitted changes; None outside git."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return f"{commit}+dirty" if status else commit


def case_lists_sha256(lists: Mapping[str, Sequence[str]]) -> str:
    """SHA-256 of named case lists (order within a list counts, the order of the names does not), so
    two runs, or a run and an evaluation, can be checked to have used exactly the same cases."""
    canonical = json.dumps({name: list(ids) for name, ids in lists.items()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_config(cls, config: RunConfig) -> RunFolder:
        name = f"{config.method.name}__{config.model.name}__{config.train.tag}"
        return cls(Path(config.train.output_dir) / config.data.name / name / f"seed{config.train.seed}")

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def checkpoint(self, which: str) -> Path:
        if which not in CHECKPOINT_NAMES:  # a user's value from Python (evaluate(checkpoint=...)): the CLI has choices
            raise CrlnError(f"checkpoint {which!r}: expected one of {', '.join(CHECKPOINT_NAMES)}")
        return self.path / f"checkpoint_{which}.pt"

    @property
    def inference_weights(self) -> Path:
        return self.path / INFERENCE_WEIGHTS_NAME

    def write_checkpoint_notes(self) -> None:
        """``CHECKPOINTS.txt``: which checkpoint file is for what."""
        atomic_write_text(self.path / "CHECKPOINTS.txt", _CHECKPOINT_NOTES)

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temp files that a killed writer left (``.<name>.<random>.tmp``); returns them."""
        stale = [p for p in self.path.glob(".*.tmp*") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def write_config(self, config: RunConfig) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config_to_dict(config), sort_keys=False))

    def write_meta(self, extra: dict[str, Any] | None = None) -> None:
        """Write ``meta.json``: versions, host, command, ``extra``, and with ``extra["split"]`` (case
        lists by role) their :func:`case_lists_sha256` as ``split_sha256``."""
        meta = {
            "crln_version": __version__,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        if isinstance(meta.get("split"), dict):
            meta["split_sha256"] = case_lists_sha256(meta["split"])
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2) + "\n")

    def recorded_split(self) -> dict[str, list[str]] | None:
        """The case lists by role that ``meta.json`` recorded at the run's start (``None``: no readable record)."""
        try:
            split = json.loads((self.path / "meta.json").read_text()).get("split")
        except (OSError, ValueError, AttributeError):
            return None
        return split if isinstance(split, dict) else None


class MetricsLog:
    """Append-only JSON-lines log; each record is flushed so a killed run keeps its history.

    With ``tensorboard_dir`` the same scalars also go to TensorBoard event files (``step`` is the
    global step; names keep their log.jsonl keys).
    """

    def __init__(self, path: Path, truncate_after_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self._tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise CrlnError(
                    "config key logging.tensorboard: the tensorboard package is not installed "
                    "(pip install tensorboard, or set logging.tensorboard=false)"
                ) from err
            self._tensorboard = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=truncate_after_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # Drop records written after the checkpoint we resume from (all of them on a fresh start).
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed).

        Raises:
            CrlnError: the log cannot be written (e.g. a full disk); the records before stay intact,
                and a torn last line is skipped by :func:`read_log`.
        """
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
        except OSError as err:
            raise CrlnError(f"cannot write {self.path}: {err.strerror or err}") from err
        if self._tensorboard is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``log.jsonl`` (a torn last line from a killed run is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
