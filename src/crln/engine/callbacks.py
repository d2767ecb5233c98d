"""What the training loop does around its iterations, as small callbacks in one fixed order.

:func:`crln.engine.trainer.train` runs each iteration (batch, ``Method.train_step``, backward, optimiser
steps, ``Method.after_optimizer_step``) and calls, at each hook point, every callback of
:func:`default_callbacks` in this order, then the callbacks the caller passed to ``train``:

1. :class:`MetricsWindow` — sums the loss terms; every ``train.log_every`` iterations writes their mean
   (over the window and the processes), the learning rate and the timings to ``log.jsonl``;
2. :class:`ProgressDisplay` — the progress bar with the loss (rank 0, ``progress=True``);
3. :class:`PeriodicValidation` — every ``train.val_every`` iterations: Dice on the held-out cases,
   ``checkpoint_best.pt`` when it is the best so far;
4. :class:`PeriodicCheckpoint` — ``checkpoint_latest.pt`` every ``train.checkpoint_every`` iterations;
5. :class:`SignalStop` — after SIGINT/SIGTERM: ``checkpoint_latest.pt``, then :class:`RunInterrupted`;
6. :class:`TimeBudget` — (``time_budget_s``) before an iteration that would end past the budget:
   ``checkpoint_latest.pt``, then the loop stops with the run incomplete.

The order is fixed, not sorted by priority: the log holds an iteration's losses before a checkpoint of
it exists, and a stop (signal, budget) saves the iteration after everything else has seen it.

Hook points (every process calls every hook, so collectives inside them line up):

- ``on_train_start(run)`` — before the first iteration of this call (after a resume's restore);
- ``on_step_start(run, step)`` — before iteration ``step`` (0-based) fetches its batch;
- ``on_step_end(run, step, out)`` — after iteration ``step``: optimisers stepped, EMA updated,
  ``run.completed == step + 1``; ``out`` is the method's loss terms;
- ``on_train_end(run)`` — the loop is left, normally, by ``run.stop_early`` or by an exception: release
  what ``on_train_start`` took (signal handlers, the progress bar).

A callback stops the run by raising (as :class:`SignalStop` does, or a test's ``KeyboardInterrupt``) or,
to end it as incomplete, by setting ``run.stop_early``. The end of a complete run (final validation,
final checkpoints) is the trainer's finish phase, not a callback.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from crln.engine import distributed
from crln.engine.progress import Progress, progress_bar
from crln.engine.state import RunState
from crln.errors import RunInterrupted

__all__ = [
    "Callback",
    "MetricsWindow",
    "PeriodicCheckpoint",
    "PeriodicValidation",
    "ProgressDisplay",
    "SignalStop",
    "TimeBudget",
    "default_callbacks",
    "validate",
]


class Callback:
    """A hook of the training loop (see the module docstring for when each method is called)."""

    def on_train_start(self, run: RunState) -> None:
        """Before the first iteration of this call."""

    def on_step_start(self, run: RunState, step: int) -> None:
        """Before iteration ``step`` (0-based) fetches its batch."""

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        """After iteration ``step``; ``out`` holds the method's loss terms."""

    def on_train_end(self, run: RunState) -> None:
        """The loop is left (also by an exception)."""


class MetricsWindow(Callback):
    """Means of the loss terms over every ``train.log_every`` iterations (and the last), with lr and timings."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0  # iterations summed since the last record (fewer than log_every after a resume)
        self.start, self.data_wait = time.perf_counter(), 0.0

    def on_train_start(self, run: RunState) -> None:
        self.start, self.data_wait = time.perf_counter(), 0.0

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        self.data_wait += run.data_wait
        for name, value in out.items():
            self.sums[name] += float(value.detach())
        self.steps += 1
        done = step + 1
        if done % run.config.train.log_every != 0 and done != run.total:
            return
        elapsed = time.perf_counter() - self.start
        record = {"step": done, "lr": run.optimizers.main.param_groups[0]["lr"]}
        record.update(distributed.mean_across_processes({k: v / self.steps for k, v in self.sums.items()}))
        record.update(
            seconds_per_iteration=elapsed / self.steps, data_wait_fraction=self.data_wait / max(elapsed, 1e-9)
        )
        assert run.log is not None
        run.log.write(record)
        self.sums.clear()
        self.steps = 0
        self.start, self.data_wait = time.perf_counter(), 0.0


class ProgressDisplay(Callback):
    """A live bar on a terminal, a plain line every few percent in a log file (rank 0 only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None

    def on_train_start(self, run: RunState) -> None:
        if self.enabled and run.main:
            self.bar = progress_bar(run.total, run.start_step, run.config.method.name)

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}", refresh=False)

    def on_train_end(self, run: RunState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def validation_dice(run: RunState) -> float:
    """Mean foreground Dice of the inference network (``eval.network``) on the held-out cases.

    Each process scores its share of the cases; the mean is taken over all of them, in case order.
    """
    from crln.inference import optimize_for_inference, sliding_window_predict
    from crln.metrics import mean_foreground_dice

    config, perf = run.config, run.perf
    network = run.method.inference_network(config.eval.network)
    was_training = network.training
    network.eval()
    scores = []
    try:
        fast = optimize_for_inference(network, perf.device)  # a forward-only copy (CPU: BN folded, channels-last)
        for index, case in distributed.shard(run.validation_cases):
            probs = sliding_window_predict(
                lambda x: fast(perf.input(x)),
                case.image,
                patch_size=config.data.patch_size,
                stride=config.eval.stride,
                num_classes=config.data.num_classes,
                sw_batch_size=config.eval.sw_batch_size,
                device=perf.device,
                amp_dtype=perf.amp_dtype,
            )
            pred = probs.argmax(0).numpy()
            scores.append((index, mean_foreground_dice(pred, case.label, config.data.num_classes)))
    finally:
        network.train(was_training)
    return float(np.mean(distributed.gather_shards(scores)))


def validate(run: RunState, step: int) -> None:
    """Validate after ``step`` iterations (nothing without held-out cases): log ``val_dice`` and keep
    ``checkpoint_best.pt`` of the best score so far."""
    if not run.validation_cases:
        return
    score = validation_dice(run)
    assert run.log is not None
    run.log.write({"step": step, "val_dice": score})
    if run.best["metric"] is None or score > run.best["metric"]:
        run.best.update(metric=score, step=step)
        run.checkpoint("best", step)


class PeriodicValidation(Callback):
    """Validation every ``train.val_every`` iterations before the last (the finish phase validates at the end)."""

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        every, done = run.config.train.val_every, step + 1
        if every and done % every == 0 and done < run.total:
            validate(run, done)


class PeriodicCheckpoint(Callback):
    """``checkpoint_latest.pt`` every ``train.checkpoint_every`` iterations before the last."""

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        done = step + 1
        if done % run.config.train.checkpoint_every == 0 and done < run.total:
            run.checkpoint("latest", done)


class SignalStop(Callback):
    """SIGINT/SIGTERM set a flag; at the end of the iteration the run saves a checkpoint and stops.

    Raises:
        RunInterrupted: from ``on_step_end`` once a signal came (to any process of the job).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def on_train_start(self, run: RunState) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        # torchrun forwards the signal to every process, not always within the same iteration: agree.
        if distributed.any_process(self.signal_name is not None):
            run.checkpoint("latest", run.completed)
            stopped = (
                f"stopped by {self.signal_name or 'a signal to another process'} after iteration {run.completed}; "
                f"checkpoint saved in {run.folder.path}"
            )
            raise RunInterrupted(f"{stopped}; continue with the same command and --resume", self.signal_name, stopped)

    def on_train_end(self, run: RunState) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TimeBudget(Callback):
    """Stop, on a checkpoint, before an iteration that would end more than ``seconds`` after this
    callback was made (``train`` makes it first thing, so data loading counts).

    The next iteration is predicted to take as long as the slowest so far (the first of a process,
    which pays warm-up costs, does not count). Every process stops at the same iteration.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.slowest = 0.0
        self.iteration_start = self.started

    def on_step_start(self, run: RunState, step: int) -> None:
        self.iteration_start = time.monotonic()

    def on_step_end(self, run: RunState, step: int, out: dict[str, torch.Tensor]) -> None:
        if run.completed >= run.total:
            return
        if step > run.start_step:
            self.slowest = max(self.slowest, time.monotonic() - self.iteration_start)
        if distributed.any_process(time.monotonic() - self.started + self.slowest > self.seconds):
            run.checkpoint("latest", run.completed)
            run.stop_early = True


def default_callbacks(progress: bool, time_budget: TimeBudget | None) -> tuple[Callback, ...]:
    """The engine's callbacks in their fixed order (module docstring); the budget last when there is one."""
    callbacks: tuple[Callback, ...] = (
        MetricsWindow(),
        ProgressDisplay(progress),
        PeriodicValidation(),
        PeriodicCheckpoint(),
        SignalStop(),
    )
    return callbacks if time_budget is None else (*callbacks, time_budget)
