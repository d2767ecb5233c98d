"""The training-method interface and its registry.

A method is a small :class:`torch.nn.Module` that owns its networks (student, teacher, extra
modules) and turns one two-stream batch into named loss terms. The engine owns the loop: it calls
:meth:`Method.train_step`, back-propagates ``out["loss"]``, steps the main optimiser, calls
:meth:`Method.after_optimizer_step` (EMA updates, the gradients of CRLN's μ), then steps the
method's extra optimisers. A method never moves devices, steps an optimiser, logs or writes files.

Hooks the engine calls, in this order (``crln.engine.trainer``):

- :meth:`Method.configure_optimizers` once, after the method is placed on its device: the main
  optimiser (default: SGD over :meth:`Method.trainable_parameters`) and any extra ones;
- :meth:`Method.stage_starts` once, then :meth:`Method.start_stage` before the first iteration of
  each later stage (multi-stage methods such as BCP);
- every iteration: :meth:`Method.train_step`, then :meth:`Method.after_optimizer_step`.

Methods never import :mod:`crln.engine` (the engine imports them): the EMA helpers are
:mod:`crln.methods.ema`, loss ramps :mod:`crln.methods.ramps`, collectives :mod:`crln.collectives`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from crln.data.batch import Batch
from crln.errors import CrlnError
from crln.method_configs import METHOD_CONFIGS, MethodConfig
from crln.method_configs import method_config_class as _config_class
from crln.methods.ema import ema_decay_at, ema_update

if TYPE_CHECKING:
    from crln.config import OptimConfig

__all__ = [
    "ExtraOptimizer",
    "Method",
    "MethodConfig",
    "Optimizers",
    "RectificationViews",
    "StageStart",
    "TeacherStudentMethod",
    "TimelineMark",
    "build_method",
    "frozen_copy",
    "method_class",
    "method_config_class",
    "method_names",
    "register_method",
]

ModelFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class StageStart:
    """A training stage of a multi-stage method (BCP: pre-training, then self-training).

    Before the iteration ``step`` (0-based, > 0) the engine calls ``Method.start_stage(step)`` (the
    method's own work, e.g. teacher ← student), then, as asked, gives the optimiser a fresh state
    (momentum buffers dropped, as a newly built optimiser) and restarts the LR schedule, which then
    runs over the stage alone (from ``step`` to the next restarting stage or the end of training).
    Everything is a function of ``step``, so a run resumed on either side of a boundary is exact.
    """

    step: int
    reset_optimizer: bool = True
    restart_lr_schedule: bool = True


@dataclass(frozen=True)
class TimelineMark:
    """An iteration where a method changes how it trains (CRLN's rectification start S, BCP's stage switch):
    a dashed line on the report's and the bench's curves."""

    step: int
    label: str  # short, for a legend: "S"
    description: str  # for a caption: "rectification starts (S = 800)"


@dataclass(frozen=True)
class RectificationViews:
    """What the report's pseudo-label rectification figure shows of one patch (:meth:`Method.rectification_views`)."""

    teacher: np.ndarray  # (K, h, w, d) softmax of the teacher's pseudo-label ȳ
    m: np.ndarray  # (K, h, w, d) softmax of the rectifier's second opinion (CRLN: the DIM's M(x))
    rectified: np.ndarray  # (K, h, w, d) softmax of the rectified pseudo-label ȳ_r
    threshold: float  # confidence at which a pseudo-label voxel counts as reliable (τ)
    start: int  # first iteration whose pseudo-labels training rectified (S)
    weight: float | None  # the learned mixing weight μ, if the method learns one


@dataclass
class ExtraOptimizer:
    """A method's own optimiser beside the main one (CRLN's μ), with its learning-rate schedule.

    The engine sets every group's ``lr`` to ``lr × poly(step, poly_iterations)`` (``lr`` itself when
    ``poly_iterations`` is 0), steps it after :meth:`Method.after_optimizer_step`, which leaves the
    gradients in ``.grad``, then zeroes them; its state is saved and restored with the checkpoint.
    """

    optimizer: torch.optim.Optimizer
    lr: float
    poly_iterations: int = 0


@dataclass
class Optimizers:
    """What :meth:`Method.configure_optimizers` returns: the main optimiser and the method's extra ones.

    The main one minimises ``out["loss"]`` under the engine's learning-rate schedule (``optim.lr_schedule``);
    ``extra`` maps a name (the checkpoint's key) to an :class:`ExtraOptimizer`.
    """

    main: torch.optim.Optimizer
    extra: dict[str, ExtraOptimizer] = field(default_factory=dict)


class Method(nn.Module):
    """Base class of training methods.

    Subclasses set ``name``, ``config_class``, ``uses_unlabeled`` and ``monitors_pseudo_labels`` and implement
    :meth:`train_step`.

    Args:
        config: the method's config dataclass (an instance of ``config_class``).
        model_factory: builds one segmentation network; called once per network the method owns.
        num_classes: C, background included.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_unlabeled: ClassVar[bool] = True
    #: Load the labels of unlabelled cases, when they exist, to monitor pseudo-label quality
    #: (``Batch.unlabeled_oracle_label``). Never used in a loss.
    monitors_pseudo_labels: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.student = model_factory()

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        """One forward pass: returns ``{"loss": total (with grad), <term>: value, ...}``.

        Args:
            batch: labelled images ``(Bl, 1, H, W, D)``, labels ``(Bl, H, W, D)`` and, for
                semi-supervised methods, unlabelled images ``(Bu, 1, H, W, D)``.
            step: 0-based iteration index (for ramp-ups and schedules).
        """
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimiser step (EMA updates, extra optimiser steps)."""

    def stage_starts(self) -> tuple[StageStart, ...]:
        """Where the stages after the first begin, in increasing order (none: one stage; see :class:`StageStart`)."""
        return ()

    def start_stage(self, step: int) -> None:
        """Called by the engine before iteration ``step`` when a stage of :meth:`stage_starts` begins there."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the engine's main optimiser updates (the student's by default)."""
        return self.student.parameters()

    def configure_optimizers(self, optim: OptimConfig) -> Optimizers:
        """The main optimiser (SGD over :meth:`trainable_parameters` with ``optim``'s settings) and none extra.

        Called once, after the method is on its device. Override to add optimisers of the method's own
        (CRLN's μ); the learning rate of the main one is set by the engine's schedule every iteration.
        """
        main = torch.optim.SGD(
            self.trainable_parameters(),
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            weight_decay=optim.weight_decay,
        )
        return Optimizers(main)

    def inference_network(self, which: str = "student") -> nn.Module:
        """The network used for validation, evaluation and prediction (``eval.network``)."""
        if which == "student":
            return self.student
        raise CrlnError(
            f"config key eval.network: {which!r} is not available for method {self.name!r} "
            f"(available: {', '.join(self.config_class.inference_networks)})"
        )

    # --- What crln report and crln bench show of a method. The class methods read the config alone, so a
    # report or a bench table needs no network for them; a method overrides them instead of the report
    # and the bench testing its name.

    @classmethod
    def report_facts(cls, config: MethodConfig) -> list[tuple[str, str]]:
        """Rows ``(fact, value)`` the run report adds to its table of run facts (none by default)."""
        del config
        return []

    @classmethod
    def timeline_marks(cls, config: MethodConfig) -> tuple[TimelineMark, ...]:
        """Iterations where the method changes how it trains, drawn on training curves (none by default)."""
        del config
        return ()

    def rectification_views(self, patch: Tensor) -> RectificationViews | None:
        """The pseudo-label rectification of one patch ``(1, C_in, h, w, d)`` on the method's device, for the
        report's figure; ``None`` (the default) for a method that does not rectify pseudo-labels."""
        del patch
        return None


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters never receive gradients (an EMA target)."""
    copy_ = copy.deepcopy(module)
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


class TeacherStudentMethod(Method):
    """A method with an EMA teacher of the student (mean teacher, UA-MT, CRLN).

    The teacher starts as a frozen copy of the student and is updated only in
    :meth:`after_optimizer_step`, as ``teacher ← d·teacher + (1 − d)·student`` with
    ``d = min(1 − 1/(step + 1), config.ema_decay)``, for every pair of :meth:`ema_pairs`.
    The config must have an ``ema_decay`` field.
    """

    def __init__(self, config: MethodConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__(config, model_factory, num_classes)
        self.teacher = frozen_copy(self.student)

    def inference_network(self, which: str = "student") -> nn.Module:
        """The student, or the EMA teacher (``which="teacher"``; its BatchNorm buffers are the EMA of the student's)."""
        return self.teacher if which == "teacher" else super().inference_network(which)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(teacher module, student module)`` pairs that the EMA updates."""
        return [(self.teacher, self.student)]

    def after_optimizer_step(self, step: int) -> None:
        decay = ema_decay_at(step, self.config.ema_decay)  # type: ignore[attr-defined]
        for teacher, student in self.ema_pairs():
            ema_update(teacher, student, decay)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (duplicates are an error).

    The name and its config class must be in :data:`crln.method_configs.METHOD_CONFIGS`, where configs
    are checked before torch is imported.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    if METHOD_CONFIGS.get(cls.name) is not cls.config_class:
        raise ValueError(f"{cls.__name__}: {cls.name!r} must map to its config_class in crln.method_configs")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Registered method names."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _config_class(name)  # an unknown name: the one-line error with the nearest spelling
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the method registered as ``name`` (:mod:`crln.method_configs`)."""
    return _config_class(name)


def build_method(config: Any, model_factory: ModelFactory, num_classes: int) -> Method:
    """Instantiate the method named by ``config.name``."""
    _config_class(config.name)  # an unknown name: the one-line error with the nearest spelling
    return _REGISTRY[config.name](config, model_factory, num_classes)
