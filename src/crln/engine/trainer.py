"""The training loop shared by every method, as a short sequence of named phases.

:func:`train` runs: prepare the run (run folder, processes, seeds; split, load and check the data;
build the method) → build the optimisers (:meth:`Method.configure_optimizers`) → restore on
``--resume`` → write the run files → the loop → finish (final validation and checkpoints).

One iteration (:func:`_iteration`), in this fixed order: batch → stage start if one begins here →
learning rate (the engine's schedule, ``optim.lr_schedule``) → ``Method.train_step`` → finite check →
backward → gradient clipping → main optimiser step → BatchNorm statistics averaged over processes →
``Method.after_optimizer_step`` (EMA, gradients of a method's own parameters) → the method's extra
optimisers (:class:`crln.methods.base.ExtraOptimizer`). Around the iterations the callbacks of
:mod:`crln.engine.callbacks` run in their documented order (log, progress, validation, checkpoint,
signal stop, time budget), then any the caller passes.

Multi-stage methods (BCP) declare stage boundaries (``Method.stage_starts``); before the first
iteration of a stage the engine calls ``method.start_stage`` and, as the stage asks, clears the
optimiser state and restarts the LR schedule over the stage (:class:`crln.methods.base.StageStart`).

The loop is resumable exactly: the batches of iteration ``k`` are a pure function of
``(seed, k)`` (see :mod:`crln.data.loader`), and the checkpoint (:mod:`crln.engine.state`) holds the
method, optimiser, grad-scaler and torch RNG states, so ``N`` iterations straight equal ``N/2`` +
resume + ``N/2``.

Under ``torchrun`` (:mod:`crln.engine.distributed`, ``docs/distributed.md``) every process runs
this loop on its share of the global batch: ``method.train_step`` runs inside
DistributedDataParallel, BatchNorm running statistics are averaged after the optimiser step (before
the EMA), validation cases are split between the processes, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crln.atomic import check_output_dir
from crln.config import RunConfig
from crln.data.batch import Batch
from crln.data.case import Case
from crln.data.loader import make_train_loader
from crln.data.sources import open_dataset
from crln.data.splits import Split, plan_split, split_difference
from crln.data.transforms import AugmentConfig, normalize_intensity
from crln.data.validate import check_channels, check_patch_fits, validate_case
from crln.engine import distributed
from crln.engine.allocator import tune_cpu_allocator
from crln.engine.callbacks import Callback, TimeBudget, default_callbacks, validate
from crln.engine.checkpoint import save_checkpoint
from crln.engine.device import Performance, run_settings, seed_everything
from crln.engine.run_folder import MetricsLog, RunFolder
from crln.engine.schedule import lr_factor, poly_lr_factor, schedule_window
from crln.engine.state import NullLog, RunState, inference_weights, read_resume_checkpoint
from crln.errors import CrlnError, TrainingDiverged
from crln.methods import Method, method_for_run
from crln.methods.base import Optimizers, StageStart

__all__ = ["TrainResult", "step_extra_optimizers", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    steps: int
    seconds: float
    best_metric: float | None
    # the trained method of this process (identical on every process); left out of repr: it prints every layer
    method: Method | None = field(default=None, repr=False)
    complete: bool = True  # False when the time budget stopped the run early (resume it with --resume)


@dataclass
class _Data:
    """The run's cases, decoded, checked and normalised, with the split that chose them."""

    split: Split
    split_rule: str
    labeled: list[Case]
    unlabeled: list[Case]
    validation: list[Case]


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``config.method`` and write the run folder.

    Args:
        config: resolved run configuration.
        resume: continue from ``checkpoint_latest.pt`` of the run folder (error if there is none).
        run_dir: run folder; default ``RunFolder.for_config(config)``.
        progress: show a progress bar with loss and ETA.
        time_budget_s: wall-clock seconds this call may take, counted from its start (data loading
            included). Before an iteration that would end past it, the loop saves
            ``checkpoint_latest.pt`` and returns with ``complete=False``; ``--resume`` continues exactly.
        callbacks: more :class:`crln.engine.callbacks.Callback` objects, called after the engine's own
            (e.g. one that raises to stop the run at a chosen iteration).

    Returns:
        A :class:`TrainResult` with the run folder.

    Raises:
        CrlnError: bad data or config, an existing run folder without ``resume``.
        TrainingDiverged: a non-finite loss or weight (a :class:`CrlnError`; the CLI exits 3).
        RunInterrupted: SIGINT or SIGTERM; ``checkpoint_latest.pt`` holds the last finished iteration.
    """
    budget = TimeBudget(time_budget_s) if time_budget_s is not None else None  # counts from here
    tune_cpu_allocator()  # activation maps reuse heap memory instead of fresh page-faulted mmaps
    with run_settings(config.train.threads):  # train.threads and train.deterministic end with the run
        return _train(config, resume, run_dir, progress, budget, callbacks)


def _train(
    config: RunConfig,
    resume: bool,
    run_dir: str | Path | None,
    progress: bool,
    budget: TimeBudget | None,
    callbacks: Sequence[Callback],
) -> TrainResult:
    """:func:`train` within its :func:`crln.engine.device.run_settings`."""
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.for_config(config)
    # Under torchrun: join the process group (cuda:LOCAL_RANK on GPUs); rank 0 alone reads and writes the folder.
    device = distributed.process_device(config.train.device)
    distributed.init_from_env(device, config.distributed.backend, config.distributed.timeout_minutes)
    distributed.run_on_main(lambda: _check_run_folder(folder, resume, option=run_dir is not None))
    perf = _seed(config, device)

    method, data = _prepare_data(config, folder if resume else None)
    run = _build_run(config, folder, method, perf, data)
    saved = read_resume_checkpoint(folder.checkpoint("latest"), config, run.world, device) if resume else None
    if saved is not None:
        run.restore(saved, folder.checkpoint("latest"))
    _write_run_files(run, data, resume)
    batches = _batches(run, data)
    if saved is not None:  # creating the iterator may draw from torch's RNG: restore the resumed state after it
        run.restore_rng(saved, distributed.get_rank())

    started = time.perf_counter()
    _loop(run, batches, (*default_callbacks(progress, budget), *callbacks))
    return _finish(run, progress, started)


def _check_run_folder(folder: RunFolder, resume: bool, option: bool) -> None:
    """The run folder is writable and holds a run exactly when ``resume`` asks for one."""
    check_output_dir(folder.path, "--run-dir" if option else "run folder (train.output_dir)")
    latest = folder.checkpoint("latest")
    if resume and not latest.exists():
        raise CrlnError(f"--resume: no checkpoint at {latest}")
    if not resume and (latest.exists() or folder.checkpoint("final").exists()):
        raise CrlnError(f"run folder {folder.path} already holds a run; pass --resume or change train.tag")


def _seed(config: RunConfig, device: torch.device) -> Performance:
    """Seed every RNG; the device's performance settings (AMP, channels-last)."""
    seed_everything(config.train.seed, config.train.deterministic)
    perf = Performance.for_device(device, config.train.amp, config.train.channels_last, config.train.deterministic)
    perf.apply_cuda_tuning()  # within train's run_settings: the flags end with the run
    return perf


def _prepare_data(config: RunConfig, resumed: RunFolder | None = None) -> tuple[Method, _Data]:
    """Split the training list (on ``--resume``, ``resumed``'s folder: the split it started with), build the
    method (it says which cases it needs), decode every case once into memory, check the cases and the
    patch size against them, and normalise the images."""
    d = config.data
    dataset = open_dataset(d)
    split, split_rule = plan_split(dataset, d)
    if resumed is not None:  # checked before the (long) decoding
        distributed.run_on_main(lambda: _check_resume_split(resumed, split, d.root))
    method = method_for_run(config)
    if split.unlabeled and not method.uses_unlabeled:  # a line of its own: it is about no other line's cases
        split_rule += f"\n  (method {config.method.name!r} does not use the unlabelled cases)"
    if distributed.is_main_process():  # the user sees which cases train how before the (long) decoding starts
        print(split_rule, flush=True)
    labeled = dataset.load_many(split.labeled, with_label=True)
    unlabeled = _load_unlabeled(dataset, split.unlabeled, method, d.train_split) if method.uses_unlabeled else []
    if method.uses_unlabeled and not unlabeled:
        raise CrlnError(
            f"data.labeled={d.labeled}: method {config.method.name!r} needs unlabelled cases but all "
            f"{len(split.labeled) + len(split.validation)} training cases are labelled or held out"
        )
    validation = dataset.load_many(split.validation, with_label=True)
    _check_cases(config, labeled, unlabeled, validation)
    for case in (*labeled, *unlabeled, *validation):
        case.image = normalize_intensity(case.image, d.intensity)  # the model's input contract (data.intensity)
    return method, _Data(split, split_rule, labeled, unlabeled, validation)


def _check_resume_split(folder: RunFolder, split: Split, root: str) -> None:
    """Refuse to resume on another split than the one the run's ``meta.json`` recorded at its start: images
    or label files added to or removed from the data folder since would silently move cases between the
    roles (a new last id becomes the validation case, the old one a training case)."""
    recorded = folder.recorded_split()
    change = split_difference(recorded, split) if recorded is not None else None
    if change is not None:
        raise CrlnError(
            f"--resume: the data in {root} now splits differently from the run's start ({change}; the split is "
            f"recorded in {folder.path / 'meta.json'}); expected the same cases: restore the data folder as it "
            "was, or start a new run (train.tag=...)"
        )


def _check_cases(config: RunConfig, labeled: list[Case], unlabeled: list[Case], validation: list[Case]) -> None:
    """Labels, classes and channels of every case; the patch fits the volumes."""
    d = config.data
    labelled = [*labeled, *validation]
    for index, case in enumerate([*labelled, *unlabeled]):
        # a label of an unlabelled case is for monitoring only: checked if present, never required
        validate_case(case, num_classes=d.num_classes, require_label=index < len(labelled), allow_channels=True)
        check_channels(case, config.model.in_channels)
    check_patch_fits([*labeled, *unlabeled, *validation], d.patch_size)


def _load_unlabeled(dataset: Any, ids: list[str], method: Method, split: str) -> list[Case]:
    """Unlabelled cases; with their labels (monitoring only) when the method asks and they exist."""
    labeled_ids = getattr(dataset, "labeled_ids", None)  # NIfTI: known without decoding anything
    all_labelled = labeled_ids is None or set(ids) <= set(labeled_ids(split))
    if method.monitors_pseudo_labels and all_labelled:
        try:
            return dataset.load_many(ids, with_label=True)
        except CrlnError:
            pass  # unlabelled data without labels: nothing to monitor against
    return dataset.load_many(ids, with_label=False)


def _build_run(config: RunConfig, folder: RunFolder, method: Method, perf: Performance, data: _Data) -> RunState:
    """Place the method on its device (compiled with ``train.compile``), build its optimisers and the grad scaler."""
    device, world = perf.device, distributed.get_world_size()
    method = perf.place(method)
    if world > 1 and config.distributed.sync_batchnorm:
        method = distributed.convert_sync_batchnorm(method, device)
    optimizers = method.configure_optimizers(config.optim)
    if config.train.compile:
        perf.compile_networks(method)
    scaler = torch.amp.GradScaler(device.type, enabled=perf.amp_dtype == torch.float16)
    main = distributed.is_main_process()
    return RunState(config, folder, method, optimizers, scaler, perf, world, main, validation_cases=data.validation)


def _write_run_files(run: RunState, data: _Data, resume: bool) -> None:
    """Rank 0: the run folder, its config, on a fresh start ``meta.json``, and the metrics log."""
    folder, config = run.folder, run.config
    if not run.main:
        run.log = NullLog()
        return
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.remove_stale_temp_files()
    folder.write_config(config)
    if not resume:
        from crln.data.prepare import training_data_record

        split = data.split
        meta: dict[str, Any] = {
            "split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "validation": split.validation},
            **training_data_record(config.data.root),  # for inference: the data's scale and preparation
            "split_rule": data.split_rule,
        }
        if run.world > 1:
            meta["distributed"] = _distributed_meta(config, run.world)
        folder.write_meta(meta)
    run.log = MetricsLog(
        folder.log_path,
        # A fresh start (start_step 0) empties the log: records of an abandoned attempt are stale.
        truncate_after_step=run.start_step,
        tensorboard_dir=folder.path / "tensorboard" if config.logging.tensorboard else None,
    )


def _distributed_meta(config: RunConfig, world: int) -> dict[str, Any]:
    """What ``meta.json`` records of a data-parallel run: processes and global batch sizes."""
    import torch.distributed as dist

    d = config.data
    return {
        "world_size": world,
        "backend": dist.get_backend(),
        "global_labeled_batch_size": d.labeled_batch_size * world,
        "global_unlabeled_batch_size": d.unlabeled_batch_size * world,
    }


def _batches(run: RunState, data: _Data) -> Iterator[Batch]:
    """The batches of iterations ``run.start_step`` … end: a pure function of (seed, step), this process's share."""
    d, rank = run.config.data, distributed.get_rank()
    loader = make_train_loader(
        data.labeled,
        data.unlabeled,
        patch_size=d.patch_size,
        labeled_batch_size=d.labeled_batch_size,
        unlabeled_batch_size=d.unlabeled_batch_size if run.method.uses_unlabeled else 0,
        augment=AugmentConfig(
            rot_flip=d.rot_flip, brightness=d.brightness, noise_sigma=d.noise_sigma, noise_clip=d.noise_clip
        ),
        seed=run.config.train.seed,
        start_step=run.start_step,
        num_steps=run.total,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and run.perf.device.type == "cuda",
        rank=rank,
        world_size=run.world,
    )
    if rank != distributed.MAIN_RANK:
        torch.manual_seed(distributed.rank_seed(run.config.train.seed, rank))  # own dropout/noise; weights built alike
    return iter(loader)


def _loop(run: RunState, batches: Iterator[Batch], callbacks: Sequence[Callback]) -> None:
    """Iterations ``run.start_step`` … ``run.total - 1`` with the callbacks around each (or until one stops it)."""
    method, total = run.method, run.total
    stage_at = {stage.step: stage for stage in method.stage_starts() if 0 < stage.step < total}
    restarts = [stage.step for stage in stage_at.values() if stage.restart_lr_schedule]
    # DDP averages the gradients of method.trainable_parameters() (student, CRLN's DIM, prototypes, CPS head).
    step_fn = distributed.wrap_for_data_parallel(method, run.perf.device) if run.world > 1 else method.train_step
    method.train()
    run.completed = run.start_step
    try:
        for callback in callbacks:
            callback.on_train_start(run)
        for step in range(run.start_step, total):
            for callback in callbacks:
                callback.on_step_start(run, step)
            wait_start = time.perf_counter()
            batch = next(batches).to(run.perf.device, non_blocking=True)
            run.data_wait = time.perf_counter() - wait_start
            if step in stage_at:  # a multi-stage method's boundary (BCP): see Method.stage_starts
                _start_stage(method, stage_at[step], run.optimizers.main)
            out = _iteration(run, batch, step, step_fn, schedule_window(step, total, restarts))
            run.completed = step + 1
            for callback in callbacks:
                callback.on_step_end(run, step, out)
            if run.stop_early:
                break
    finally:
        for callback in callbacks:
            callback.on_train_end(run)


def _iteration(
    run: RunState, batch: Batch, step: int, step_fn: Callable[..., dict[str, torch.Tensor]], window: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """One iteration on ``batch``: the method's loss, backward, the optimiser steps (module docstring).

    ``window`` is ``(step within its stage, stage length)`` for the main learning-rate schedule.
    """
    config, perf, method, optimizer, scaler = run.config, run.perf, run.method, run.optimizers.main, run.scaler
    batch.labeled_image = perf.input(batch.labeled_image)
    if batch.unlabeled_image is not None:
        batch.unlabeled_image = perf.input(batch.unlabeled_image)
    for group in optimizer.param_groups:
        group["lr"] = config.optim.lr * _lr_factor(config, *window)
    with perf.autocast():
        out = step_fn(batch, step)
    _check_finite(out, step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    if config.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), config.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    distributed.average_batchnorm_statistics_(method)  # before the EMA: same student, same teacher
    method.after_optimizer_step(step)
    step_extra_optimizers(run.optimizers, step)
    return out


def step_extra_optimizers(optimizers: Optimizers, step: int) -> None:
    """Step a method's own optimisers (after ``Method.after_optimizer_step`` of iteration ``step`` left their
    gradients), each at its poly-decayed rate (:class:`crln.methods.base.ExtraOptimizer`), then zero them.

    Code that runs iterations by hand (benchmarks, unit tests) calls it where the engine does.
    """
    for extra in optimizers.extra.values():
        factor = poly_lr_factor(step, extra.poly_iterations) if extra.poly_iterations > 0 else 1.0
        for group in extra.optimizer.param_groups:
            group["lr"] = extra.lr * factor
        extra.optimizer.step()
        extra.optimizer.zero_grad(set_to_none=True)


def _lr_factor(config: RunConfig, step: int, total: int) -> float:
    """The configured schedule's multiplier of ``optim.lr`` at 0-based ``step`` of ``total``."""
    o = config.optim
    return lr_factor(step, total, o.lr_schedule, power=o.poly_power, step_size=o.lr_step_size, gamma=o.lr_step_gamma)


def _start_stage(method: Method, stage: StageStart, optimizer: torch.optim.Optimizer) -> None:
    """The engine's side of a stage boundary: the method's own work, then a fresh optimiser state if asked."""
    method.start_stage(stage.step)
    if stage.reset_optimizer:
        optimizer.state.clear()  # what a newly built optimiser holds: no momentum buffers


def _check_finite(out: dict[str, torch.Tensor], step: int) -> None:
    bad = {name: v.item() for name, v in out.items() if v.numel() == 1 and not torch.isfinite(v.detach()).all()}
    if bad:
        # The named terms first: the total "loss" is non-finite whenever one of them is.
        shown = ", ".join(f"{name!r} is {bad[name]}" for name in sorted(bad, key=lambda name: name == "loss"))
        raise TrainingDiverged(
            f"training diverged: loss term {shown} at iteration {step + 1}; "
            "the last good checkpoint is kept (lower optim.lr or check the data)",
            iteration=step + 1,
        )


def _finish(run: RunState, progress: bool, started: float) -> TrainResult:
    """After the loop: an incomplete run (time budget) just closes its log; a complete one validates a
    last time, writes its final checkpoints and the inference weights. Every process returns together.

    ``started``: ``time.perf_counter()`` when the loop began (``TrainResult.seconds`` counts from it).
    """
    config, total = run.config, run.total
    if not run.stop_early:  # stopped early (time budget): no final validation, no checkpoint_final.pt
        if config.train.val_every:  # train.val_every=0: no validation at all
            announce = progress and run.main and bool(run.validation_cases)
            final_start = time.perf_counter()
            if announce:
                print(f"final validation on {len(run.validation_cases)} held-out case(s) ...", flush=True)
            validate(run, total)
            if announce:
                print(f"final validation done ({time.perf_counter() - final_start:.1f} s)", flush=True)
        run.checkpoint("latest", total)
        run.checkpoint("final", total)
        if run.main:
            from crln.data.prepare import training_data_record

            shared = inference_weights(run.method, config, total, training_data_record(config.data.root))
            save_checkpoint(run.folder.inference_weights, shared)
            run.folder.write_checkpoint_notes()
    if run.log is not None:
        run.log.close()  # every record was flushed as written; this only releases the TensorBoard writer
    distributed.barrier()  # the final checkpoint exists for every process once train() returns (--evaluate)
    metric = run.best["metric"]
    best = None if metric is None or math.isnan(metric) else metric
    seconds = time.perf_counter() - started
    return TrainResult(run.folder.path, run.completed, seconds, best, run.method, complete=not run.stop_early)
