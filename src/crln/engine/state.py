"""The state of one training run: what the loop and its callbacks share, and what a checkpoint keeps of it.

A training checkpoint is written by :meth:`RunState.checkpoint` and read back by
:func:`read_resume_checkpoint` and :meth:`RunState.restore`; this module is the one place that
knows its keys (the file format and its checks are :mod:`crln.engine.checkpoint`):

``method`` (name), ``config`` (resolved, plain dict), ``step`` (completed iterations),
``method_state``, ``optimizer`` (the main optimiser), ``scaler``, ``torch_rng``, ``best``
(``{"metric", "step"}``), ``extra_optimizers`` (``{name: state}`` of a method's own optimisers,
:class:`crln.methods.base.ExtraOptimizer`; checkpoints written before it existed lack it, and those
optimisers then start fresh, which is exact for CRLN's μ: its momentum lives in ``method_state``),
and with several processes ``world_size`` and ``torch_rng_per_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crln.config import RUN_INVARIANT_KEYS, RunConfig, config_changes, config_to_dict
from crln.data.case import Case
from crln.engine import distributed
from crln.engine.checkpoint import INFERENCE_WEIGHTS, load_checkpoint, restore_module_state, save_checkpoint
from crln.engine.device import Performance
from crln.engine.run_folder import MetricsLog, RunFolder
from crln.errors import CrlnError, TrainingDiverged

if TYPE_CHECKING:  # the engine names methods' types here; only the trainer builds one
    from crln.methods import Method
    from crln.methods.base import Optimizers

__all__ = ["NullLog", "RunState", "inference_weights", "read_resume_checkpoint", "resume_config_changes"]


class NullLog:
    """The metrics log of processes other than rank 0: they compute every record but write none."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


@dataclass
class RunState:
    """A training run in progress: built by :func:`crln.engine.trainer.train`, read by the callbacks.

    ``validation_cases`` are the held-out training cases (normalised; possibly none);
    ``start_step`` and ``best`` come from the checkpoint on resume; ``completed`` counts the finished
    iterations; a callback sets ``stop_early`` to leave the loop after the current iteration (the run is
    then incomplete); ``data_wait`` is the seconds the current iteration waited for its batch.
    """

    config: RunConfig
    folder: RunFolder
    method: Method
    optimizers: Optimizers
    scaler: torch.amp.GradScaler
    perf: Performance
    world: int
    main: bool
    validation_cases: list[Case] = field(default_factory=list)
    start_step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"metric": None, "step": None})
    log: MetricsLog | NullLog | None = None
    completed: int = 0
    stop_early: bool = False
    data_wait: float = 0.0

    @property
    def total(self) -> int:
        """Iterations of the whole run (``train.iterations``)."""
        return self.config.train.iterations

    def checkpoint(self, which: str, step: int) -> None:
        """Write ``checkpoint_<which>.pt`` after ``step`` iterations (every process calls it; rank 0 writes).

        Raises:
            TrainingDiverged: a non-finite weight; the last checkpoint on disk stays a good one.
        """
        _check_finite_weights(self.method, step)
        rng = torch.get_rng_state()
        extra: dict[str, Any] = {}
        if self.world > 1:
            # Every process draws its own dropout/noise stream: keep each one for an exact resume.
            extra = {"world_size": self.world, "torch_rng_per_rank": distributed.all_gather_objects(rng)}
            distributed.verify_identical(self.method.state_dict().items(), f"checkpoint at iteration {step}")
        if not self.main:
            return
        state = {
            "method": self.config.method.name,
            "config": config_to_dict(self.config),
            "step": step,
            "method_state": self.method.state_dict(),
            "optimizer": self.optimizers.main.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": rng,
            "best": self.best,
            "extra_optimizers": {name: e.optimizer.state_dict() for name, e in self.optimizers.extra.items()},
            **extra,
        }
        save_checkpoint(self.folder.checkpoint(which), state)

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load the weights, optimiser and scaler states, step and best score of a checkpoint read by
        :func:`read_resume_checkpoint` (the RNG follows later: :meth:`restore_rng`)."""
        restore_module_state(self.method, state["method_state"], path)
        self.optimizers.main.load_state_dict(state["optimizer"])
        saved_extra = state.get("extra_optimizers", {})
        for name, extra in self.optimizers.extra.items():
            if name in saved_extra:
                extra.optimizer.load_state_dict(saved_extra[name])
        self.scaler.load_state_dict(state["scaler"])
        self.start_step, self.best = int(state["step"]), dict(state["best"])

    def restore_rng(self, state: dict[str, Any], rank: int) -> None:
        """This process's torch RNG state of the checkpoint."""
        torch.set_rng_state(state["torch_rng"] if self.world == 1 else state["torch_rng_per_rank"][rank])


def read_resume_checkpoint(path: Path, config: RunConfig, world: int, device: torch.device) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues, checked against this run's config and number of processes.

    Several processes: rank 0 reads the file on CPU and hands it to the others (no shared disk needed).

    Raises:
        CrlnError: a config that changes what is trained, or another number of processes.
    """

    def load() -> dict[str, Any]:
        loaded = load_checkpoint(path, map_location=device if world == 1 else "cpu")
        _check_resume_config(loaded["config"], config_to_dict(config), path)
        _check_resume_world_size(loaded, world, path)
        return loaded

    return distributed.run_on_main(load)


def _check_finite_weights(method: Method, step: int) -> None:
    """Refuse to checkpoint non-finite weights, so that the last checkpoint on disk stays a good one."""
    for name, value in method.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(
                f"training diverged: weight {name!r} is not finite after iteration {step}; "
                "the last good checkpoint is kept (lower optim.lr or check the data)",
                iteration=step,
            )


# A resumed run may also be made longer, and validated at other iterations from then on.
_RESUMABLE_CHANGES = RUN_INVARIANT_KEYS | {"train.iterations", "train.val_every"}


def resume_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every change of ``current`` against the ``saved`` config of a run that forbids
    resuming it (what is trained changes; the run's length, where it runs and how fast may change)."""
    return config_changes(saved, current, _RESUMABLE_CHANGES)


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint under a config that changes what is being trained."""
    changed = resume_config_changes(saved, current)
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise CrlnError(
            f"--resume: {path} was trained with a different config ({', '.join(changed[:4])}{more}); "
            "start a new run (train.tag=...) instead"
        )


def _check_resume_world_size(state: dict[str, Any], world: int, path: Path) -> None:
    """The global batch is per-process batch × processes: resuming on another number would change it."""
    saved = int(state.get("world_size", 1))
    if saved != world:
        raise CrlnError(
            f"--resume: {path} was trained by {saved} process(es), this run has {world}; resume with "
            f"torchrun --nproc_per_node=... giving {saved} processes in all (the global batch would change)"
        )


def inference_weights(
    method: Method, config: RunConfig, step: int, training_data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict of ``model_final.pt``: the config and the inference network's weights only
    (no teacher, optimiser or RNG state), small enough to share; :func:`crln.predictor.network_from_checkpoint`
    reads it.

    The network is :meth:`Method.inference_network` of ``eval.network`` (student, teacher or CRLN's
    rectified teacher, which brings its DIM and μ along). ``training_data``
    (:func:`crln.data.prepare.training_data_record`) travels with it, so that a copy shared without its
    run folder still predicts on raw scans as the run would.
    """
    network = method.inference_network(config.eval.network)
    return {
        "method": config.method.name,
        "config": config_to_dict(config),
        "step": step,
        "contents": INFERENCE_WEIGHTS,
        "method_state": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "training_data": dict(training_data or {}),
    }
