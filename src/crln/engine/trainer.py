"""The training loop shared by every method.

Order of work after each ``Method.train_step`` (fixed and documented):
backward → gradient clipping → optimiser step → LR schedule → ``method.after_optimizer_step``
(EMA, extra optimiser steps) → metrics log → validation → checkpoint.

Multi-stage methods (BCP) declare stage boundaries (``Method.stage_starts``); before the first
iteration of a stage the engine calls ``method.start_stage`` and, as the stage asks, clears the
optimiser state and restarts the LR schedule over the stage (:class:`crln.methods.base.StageStart`).

The loop is resumable exactly: the batches of iteration ``k`` are a pure function of
``(seed, k)`` (see :mod:`crln.data.loader`), and the checkpoint holds the method, optimiser,
grad-scaler and torch RNG states, so ``N`` iterations straight equal ``N/2`` + resume + ``N/2``.

Under ``torchrun`` (:mod:`crln.engine.distributed`, ``docs/distributed.md``) every process runs
this loop on its share of the global batch: ``method.train_step`` runs inside
DistributedDataParallel, BatchNorm running statistics are averaged after the optimiser step (before
the EMA), validation cases are split between the processes, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crln.atomic import check_output_dir
from crln.config import OptimConfig, RunConfig, config_to_dict
from crln.data.case import Case
from crln.data.loader import make_train_loader
from crln.data.sources import open_dataset
from crln.data.splits import plan_split
from crln.data.transforms import AugmentConfig, normalize_intensity
from crln.data.validate import check_channels, check_patch_fits, validate_case
from crln.engine import distributed
from crln.engine.allocator import tune_cpu_allocator
from crln.engine.checkpoint import load_checkpoint, restore_module_state, save_checkpoint
from crln.engine.device import Performance, seed_everything
from crln.engine.progress import progress_bar
from crln.engine.run_folder import MetricsLog, RunFolder
from crln.engine.schedule import lr_factor, schedule_window
from crln.errors import CrlnError, RunInterrupted, TrainingDiverged
from crln.methods import Method, build_method
from crln.methods.base import StageStart
from crln.predictor import build_network_factory, inference_weights

__all__ = ["TrainResult", "train"]


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


def _validate(method: Method, cases: list[Case], config: RunConfig, perf: Performance) -> float:
    """Mean foreground Dice of the inference network on held-out training cases."""
    from crln.inference import optimize_for_inference, sliding_window_predict
    from crln.metrics import mean_foreground_dice

    network = method.inference_network(config.eval.network)
    was_training = network.training
    network.eval()
    scores = []
    try:
        fast = optimize_for_inference(network, perf.device)  # a forward-only copy (CPU: BN folded, channels-last)
        # Each process scores its share of the cases; the mean is taken over all of them, in case order.
        for index, case in distributed.shard(cases):
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
            scores.append((index, mean_foreground_dice(probs.argmax(0).numpy(), case.label, config.data.num_classes)))
    finally:
        network.train(was_training)
    return float(np.mean(distributed.gather_shards(scores)))


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the iteration and stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# Settings a resumed run may change: where and how fast it runs, and how long.
_RESUMABLE_CHANGES = {
    "train.iterations",
    "train.device",
    "train.threads",
    "train.log_every",
    "train.val_every",
    "train.checkpoint_every",
    "train.output_dir",
    "distributed.backend",
    "distributed.timeout_minutes",
    "data.num_workers",
    "data.pin_memory",
    "data.root",
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint under a config that changes what is being trained."""
    old, new = _flatten(saved), _flatten(current)
    # Keys the saved config lacks are fields added to crln since: they hold their defaults.
    changed = sorted(k for k in old if old[k] != new.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise CrlnError(
            f"--resume: {path} was trained with a different config ({shown}{more}); "
            "start a new run (train.tag=...) instead"
        )


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


def _lr_factor(optim: OptimConfig, step: int, total: int) -> float:
    """The configured schedule's multiplier of ``optim.lr`` at 0-based ``step`` of ``total``."""
    return lr_factor(
        step, total, optim.lr_schedule, power=optim.poly_power, step_size=optim.lr_step_size, gamma=optim.lr_step_gamma
    )


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
            "the last good checkpoint is kept (lower optim.lr or check the data)"
        )


def _check_finite_weights(method: Method, step: int) -> None:
    """Refuse to checkpoint non-finite weights, so that the last checkpoint on disk stays a good one."""
    for name, value in method.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(
                f"training diverged: weight {name!r} is not finite after iteration {step}; "
                "the last good checkpoint is kept (lower optim.lr or check the data)"
            )


class _NullLog:
    """The metrics log of processes other than rank 0: they compute every record but write none."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


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


def _check_resume_world_size(state: dict[str, Any], world: int, path: Path) -> None:
    """The global batch is per-process batch × processes: resuming on another number would change it."""
    saved = int(state.get("world_size", 1))
    if saved != world:
        raise CrlnError(
            f"--resume: {path} was trained by {saved} process(es), this run has {world}; resume with "
            f"torchrun --nproc_per_node=... giving {saved} processes in all (the global batch would change)"
        )


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
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

    Returns:
        A :class:`TrainResult` with the run folder.

    Raises:
        CrlnError: bad data or config, an existing run folder without ``resume``.
        TrainingDiverged: a non-finite loss or weight (a :class:`CrlnError`; the CLI exits 3).
        RunInterrupted: SIGINT or SIGTERM; ``checkpoint_latest.pt`` holds the last finished iteration.
    """
    started = time.monotonic()  # the time budget counts from here
    tune_cpu_allocator()  # activation maps reuse heap memory instead of fresh page-faulted mmaps
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.for_config(config)
    latest = folder.checkpoint("latest")
    # Under torchrun: join the process group (cuda:LOCAL_RANK on GPUs); rank 0 alone reads and writes the folder.
    device = distributed.process_device(config.train.device)
    distributed.init_from_env(device, config.distributed.backend, config.distributed.timeout_minutes)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = distributed.is_main_process()

    def check_run_folder() -> None:
        check_output_dir(folder.path, "--run-dir" if run_dir is not None else "run folder (train.output_dir)")
        if resume and not latest.exists():
            raise CrlnError(f"--resume: no checkpoint at {latest}")
        if not resume and (latest.exists() or folder.checkpoint("final").exists()):
            raise CrlnError(f"run folder {folder.path} already holds a run; pass --resume or change train.tag")

    distributed.run_on_main(check_run_folder)

    seed_everything(config.train.seed, config.train.deterministic)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    perf = Performance.for_device(device, config.train.amp, config.train.channels_last, config.train.deterministic)

    # Data: split the training list, decode every case once into memory.
    d = config.data
    dataset = open_dataset(d)
    split, split_rule = plan_split(dataset, d)
    method = build_method(config.method, build_network_factory(config), d.num_classes)
    if main:  # the user sees which cases train how before the (long) decoding starts
        unused = "" if method.uses_unlabeled else f" (method {config.method.name!r} does not use unlabelled cases)"
        print(split_rule + unused, flush=True)
    labeled_cases = dataset.load_many(split.labeled, with_label=True)
    unlabeled_cases = _load_unlabeled(dataset, split.unlabeled, method, d.train_split) if method.uses_unlabeled else []
    if method.uses_unlabeled and not unlabeled_cases:
        raise CrlnError(
            f"data.labeled={d.labeled}: method {config.method.name!r} needs unlabelled cases but all "
            f"{len(split.labeled) + len(split.validation)} training cases are labelled or held out"
        )
    validation_cases = dataset.load_many(split.validation, with_label=True)
    channels = config.model.in_channels
    labeled_streams = [*labeled_cases, *validation_cases]
    for index, case in enumerate([*labeled_streams, *unlabeled_cases]):
        # a label of an unlabelled case is for monitoring only: checked if present, never required
        required = index < len(labeled_streams)
        validate_case(case, num_classes=d.num_classes, require_label=required, allow_channels=True)
        check_channels(case, channels)
    check_patch_fits([*labeled_cases, *unlabeled_cases, *validation_cases], d.patch_size)
    for case in (*labeled_cases, *unlabeled_cases, *validation_cases):
        case.image = normalize_intensity(case.image, d.intensity)  # the model's input contract (data.intensity)

    method = perf.place(method)
    if world > 1 and config.distributed.sync_batchnorm:
        method = distributed.convert_sync_batchnorm(method, device)
    optimizer = torch.optim.SGD(
        method.trainable_parameters(),
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        nesterov=config.optim.nesterov,
        weight_decay=config.optim.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=perf.amp_dtype == torch.float16)

    start_step, best = 0, {"metric": None, "step": None}
    if resume:

        def load_resume_state() -> dict[str, Any]:
            # Several processes: rank 0 reads the file on CPU and hands it to the others (no shared disk needed).
            loaded = load_checkpoint(latest, map_location=device if world == 1 else "cpu")
            _check_resume_config(loaded["config"], config_to_dict(config), latest)
            _check_resume_world_size(loaded, world, latest)
            return loaded

        state = distributed.run_on_main(load_resume_state)
        restore_module_state(method, state["method_state"], latest)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, best = int(state["step"]), dict(state["best"])
    if main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.remove_stale_temp_files()
        folder.write_config(config)
    if main and not resume:
        from crln.data.prepare import recorded_scale

        meta: dict[str, Any] = {
            "split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "validation": split.validation},
            "data_scale": recorded_scale(d.root),  # inference adapts eval.stride to data at other scales
            "split_rule": split_rule,
        }
        if world > 1:
            meta["distributed"] = _distributed_meta(config, world)
        folder.write_meta(meta)
    log: MetricsLog | _NullLog = (
        MetricsLog(
            folder.log_path,
            # A fresh start (start_step 0) empties the log: records of an abandoned attempt are stale.
            truncate_after_step=start_step,
            tensorboard_dir=folder.path / "tensorboard" if config.logging.tensorboard else None,
        )
        if main
        else _NullLog()
    )

    total = config.train.iterations
    stage_at = {stage.step: stage for stage in method.stage_starts() if 0 < stage.step < total}
    restarts = [stage.step for stage in stage_at.values() if stage.restart_lr_schedule]

    def checkpoint(which: str, step: int) -> None:
        _check_finite_weights(method, step)
        rng = torch.get_rng_state()
        extra: dict[str, Any] = {}
        if world > 1:
            # Every process draws its own dropout/noise stream: keep each one for an exact resume.
            extra = {"world_size": world, "torch_rng_per_rank": distributed.all_gather_objects(rng)}
            distributed.verify_identical(method.state_dict().items(), f"checkpoint at iteration {step}")
        if not main:
            return
        save_checkpoint(
            folder.checkpoint(which),
            {
                "method": config.method.name,
                "config": config_to_dict(config),
                "step": step,
                "method_state": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": rng,
                "best": best,
                **extra,
            },
        )

    def validate(step: int) -> None:
        if not validation_cases:
            return
        score = _validate(method, validation_cases, config, perf)
        log.write({"step": step, "val_dice": score})
        if best["metric"] is None or score > best["metric"]:
            best.update(metric=score, step=step)
            checkpoint("best", step)

    loader = make_train_loader(
        labeled_cases,
        unlabeled_cases,
        patch_size=d.patch_size,
        labeled_batch_size=d.labeled_batch_size,
        unlabeled_batch_size=d.unlabeled_batch_size if method.uses_unlabeled else 0,
        augment=AugmentConfig(
            rot_flip=d.rot_flip, brightness=d.brightness, noise_sigma=d.noise_sigma, noise_clip=d.noise_clip
        ),
        seed=config.train.seed,
        start_step=start_step,
        num_steps=total,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and device.type == "cuda",
        rank=rank,
        world_size=world,
    )
    # A live bar on a terminal, a plain line every few percent in a log file.
    bar = progress_bar(total, start_step, config.method.name) if progress and main else None

    # Creating the iterator may draw from torch's RNG: restore the resumed RNG state after it.
    if rank != distributed.MAIN_RANK:
        torch.manual_seed(distributed.rank_seed(config.train.seed, rank))  # own dropout/noise; weights built alike
    batches = iter(loader)
    if resume:
        torch.set_rng_state(state["torch_rng"] if world == 1 else state["torch_rng_per_rank"][rank])
    # DDP averages the gradients of method.trainable_parameters() (student, CRLN's DIM, prototypes, CPS head).
    step_fn = distributed.wrap_for_data_parallel(method, device) if world > 1 else method.train_step
    stop = _StopRequest()
    method.train()
    sums: dict[str, float] = defaultdict(float)
    window_steps = 0  # iterations summed since the last record (fewer than log_every after a resume)
    window_start, data_wait, t0 = time.perf_counter(), 0.0, time.perf_counter()
    completed = start_step
    slowest_iteration, stopped_on_budget = 0.0, False
    try:
        stop.install()
        for step in range(start_step, total):
            iteration_start = time.monotonic()
            wait_start = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            data_wait += time.perf_counter() - wait_start
            batch.labeled_image = perf.input(batch.labeled_image)
            if batch.unlabeled_image is not None:
                batch.unlabeled_image = perf.input(batch.unlabeled_image)
            if step in stage_at:  # a multi-stage method's boundary (BCP): see Method.stage_starts
                _start_stage(method, stage_at[step], optimizer)
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * _lr_factor(config.optim, *schedule_window(step, total, restarts))

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
            completed = step + 1

            for name, value in out.items():
                sums[name] += float(value.detach())
            window_steps += 1
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                n = window_steps
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "lr": optimizer.param_groups[0]["lr"]}
                record.update(distributed.mean_across_processes({k: v / n for k, v in sums.items()}))
                record.update(seconds_per_iteration=elapsed / n, data_wait_fraction=data_wait / max(elapsed, 1e-9))
                log.write(record)
                sums.clear()
                window_steps = 0
                window_start, data_wait = time.perf_counter(), 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}", refresh=False)
            if config.train.val_every and done % config.train.val_every == 0 and done < total:
                validate(done)
            if done % config.train.checkpoint_every == 0 and done < total:
                checkpoint("latest", done)
            # torchrun forwards the signal to every process, not always within the same iteration: agree.
            if distributed.any_process(stop.signal_name is not None):
                checkpoint("latest", completed)
                raise RunInterrupted(
                    f"stopped by {stop.signal_name or 'a signal to another process'} after iteration {completed}; "
                    f"checkpoint saved in {folder.path}; continue with the same command and --resume",
                    stop.signal_name,
                )
            if time_budget_s is not None and done < total:
                if step > start_step:  # the first iteration of a process pays warm-up costs
                    slowest_iteration = max(slowest_iteration, time.monotonic() - iteration_start)
                # every process must stop at the same iteration
                if distributed.any_process(time.monotonic() - started + slowest_iteration > time_budget_s):
                    checkpoint("latest", completed)
                    stopped_on_budget = True
                    break
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()

    if stopped_on_budget:  # no final validation, no checkpoint_final.pt: the run is not finished
        log.close()
        distributed.barrier()
        best_metric = None if best["metric"] is None or math.isnan(best["metric"]) else best["metric"]
        return TrainResult(folder.path, completed, time.perf_counter() - t0, best_metric, method, complete=False)

    if config.train.val_every:  # train.val_every=0: no validation at all
        final_start = time.perf_counter()
        if progress and main and validation_cases:
            print(f"final validation on {len(validation_cases)} held-out case(s) ...", flush=True)
        validate(total)
        if progress and main and validation_cases:
            print(f"final validation done ({time.perf_counter() - final_start:.1f} s)", flush=True)
    checkpoint("latest", total)
    checkpoint("final", total)
    if main:
        save_checkpoint(folder.inference_weights, inference_weights(method, config, total))
        folder.write_checkpoint_notes()
    log.close()  # every record was flushed as written; this only releases the TensorBoard writer
    distributed.barrier()  # the final checkpoint exists for every process once train() returns (--evaluate)
    return TrainResult(
        folder.path,
        total,
        time.perf_counter() - t0,
        None if best["metric"] is None or math.isnan(best["metric"]) else best["metric"],
        method,
    )
