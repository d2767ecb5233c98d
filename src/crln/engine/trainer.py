"""The training loop shared by every method.

Order of work after each ``Method.train_step`` (fixed and documented):
backward → gradient clipping → optimiser step → LR schedule → ``method.after_optimizer_step``
(EMA, extra optimiser steps) → metrics log → validation → checkpoint.

The loop is resumable exactly: the batches of iteration ``k`` are a pure function of
``(seed, k)`` (see :mod:`crln.data.loader`), and the checkpoint holds the method, optimiser,
grad-scaler and torch RNG states, so ``N`` iterations straight equal ``N/2`` + resume + ``N/2``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crln.config import RunConfig, build_config, config_to_dict
from crln.data.case import Case
from crln.data.loader import make_train_loader
from crln.data.sources import open_dataset
from crln.data.splits import split_train
from crln.data.transforms import AugmentConfig
from crln.data.validate import validate_case
from crln.engine.checkpoint import load_checkpoint, save_checkpoint
from crln.engine.device import Performance, resolve_device, seed_everything
from crln.engine.run_folder import MetricsLog, RunFolder
from crln.engine.schedule import poly_lr_factor
from crln.errors import CrlnError
from crln.methods import Method, build_method
from crln.models import VNet

__all__ = ["TrainResult", "build_network_factory", "method_from_checkpoint", "train"]


def build_network_factory(config: RunConfig):
    """A zero-argument callable building the configured segmentation network."""
    m, num_classes = config.model, config.data.num_classes

    def factory() -> nn.Module:
        return VNet(m.in_channels, num_classes, m.n_filters, m.normalization, m.dropout)

    return factory


def method_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[Method, RunConfig]:
    """Rebuild a method (all its networks, weights loaded) and its config from a checkpoint dict."""
    config = build_config(checkpoint["config"])
    method = build_method(config.method, build_network_factory(config), config.data.num_classes)
    try:
        method.load_state_dict(checkpoint["method_state"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CrlnError(f"checkpoint does not match its config's architecture ({first[:200]})") from err
    return method, config


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    steps: int
    seconds: float
    best_metric: float | None


def _validate(method: Method, cases: list[Case], config: RunConfig, perf: Performance) -> float:
    """Mean foreground Dice of the inference network on held-out training cases."""
    from crln.inference import sliding_window_predict
    from crln.metrics import dice

    network = method.inference_network()
    was_training = network.training
    network.eval()
    scores = []
    try:
        for case in cases:
            probs = sliding_window_predict(
                lambda x: network(perf.input(x)),
                case.image,
                patch_size=config.data.patch_size,
                stride=config.eval.stride,
                num_classes=config.data.num_classes,
                sw_batch_size=config.eval.sw_batch_size,
                device=perf.device,
                amp_dtype=perf.amp_dtype,
            )
            pred = probs.argmax(0).numpy()
            per_class = [dice(pred == c, case.label == c) for c in range(1, config.data.num_classes)]
            scores.append(float(np.mean(per_class)))
    finally:
        network.train(was_training)
    return float(np.mean(scores))


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


def _load_unlabeled(dataset: Any, ids: list[str], method: Method) -> list[Case]:
    """Unlabelled cases; with their labels (monitoring only) when the method asks and they exist."""
    if method.monitors_pseudo_labels:
        try:
            return dataset.load_many(ids, with_label=True)
        except CrlnError:
            pass  # unlabelled data without labels: nothing to monitor against
    return dataset.load_many(ids, with_label=False)


def _check_finite(out: dict[str, torch.Tensor], step: int) -> None:
    for name, value in out.items():
        if value.numel() == 1 and not torch.isfinite(value.detach()).all():
            raise CrlnError(
                f"training diverged: loss term {name!r} is {value.item()} at iteration {step + 1}; "
                "the last good checkpoint is kept (lower optim.lr or check the data)"
            )


def train(
    config: RunConfig, *, resume: bool = False, run_dir: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Train ``config.method`` and write the run folder.

    Args:
        config: resolved run configuration.
        resume: continue from ``checkpoint_latest.pt`` of the run folder (error if there is none).
        run_dir: run folder; default ``RunFolder.for_config(config)``.
        progress: show a progress bar with loss and ETA.

    Returns:
        A :class:`TrainResult` with the run folder.

    Raises:
        CrlnError: bad data or config, an existing run folder without ``resume``, a diverged loss.
    """
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.for_config(config)
    latest = folder.checkpoint("latest")
    if resume and not latest.exists():
        raise CrlnError(f"--resume: no checkpoint at {latest}")
    if not resume and (latest.exists() or folder.checkpoint("final").exists()):
        raise CrlnError(f"run folder {folder.path} already holds a run; pass --resume or change train.tag")

    seed_everything(config.train.seed, config.train.deterministic)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    perf = Performance.for_device(device, config.train.amp, config.train.channels_last, config.train.deterministic)

    # Data: split the training list, decode every case once into memory.
    d = config.data
    dataset = open_dataset(d)
    split = split_train(dataset.ids(d.train_split), labeled=d.labeled, validation=d.validation)
    method = build_method(config.method, build_network_factory(config), d.num_classes)
    labeled_cases = dataset.load_many(split.labeled, with_label=True)
    unlabeled_cases = _load_unlabeled(dataset, split.unlabeled, method) if method.uses_unlabeled else []
    if method.uses_unlabeled and not unlabeled_cases:
        raise CrlnError(
            f"data.labeled={d.labeled}: method {config.method.name!r} needs unlabelled cases but all "
            f"{len(split.labeled) + len(split.validation)} training cases are labelled or held out"
        )
    validation_cases = dataset.load_many(split.validation, with_label=True)
    for case in (*labeled_cases, *validation_cases):
        validate_case(case, num_classes=d.num_classes, require_label=True)

    method = perf.place(method)
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
        state = load_checkpoint(latest, map_location=device)
        _check_resume_config(state["config"], config_to_dict(config), latest)
        method.load_state_dict(state["method_state"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, best = int(state["step"]), dict(state["best"])
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.remove_stale_temp_files()
    folder.write_config(config)
    if not resume:
        folder.write_meta(
            {"split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "validation": split.validation}}
        )
    log = MetricsLog(
        folder.log_path,
        truncate_after_step=start_step if resume else None,
        tensorboard_dir=folder.path / "tensorboard" if config.logging.tensorboard else None,
    )

    total = config.train.iterations

    def checkpoint(which: str, step: int) -> None:
        save_checkpoint(
            folder.checkpoint(which),
            {
                "method": config.method.name,
                "config": config_to_dict(config),
                "step": step,
                "method_state": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "best": best,
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
        augment=AugmentConfig(rot_flip=d.rot_flip, noise_sigma=d.noise_sigma, noise_clip=d.noise_clip),
        seed=config.train.seed,
        start_step=start_step,
        num_steps=total,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and device.type == "cuda",
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"{config.method.name}", dynamic_ncols=True)

    # Creating the iterator may draw from torch's RNG: restore the resumed RNG state after it.
    batches = iter(loader)
    if resume:
        torch.set_rng_state(state["torch_rng"])
    stop = _StopRequest()
    method.train()
    sums: dict[str, float] = defaultdict(float)
    window_start, data_wait, t0 = time.perf_counter(), 0.0, time.perf_counter()
    completed = start_step
    try:
        stop.install()
        for step in range(start_step, total):
            wait_start = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            data_wait += time.perf_counter() - wait_start
            batch.labeled_image = perf.input(batch.labeled_image)
            if batch.unlabeled_image is not None:
                batch.unlabeled_image = perf.input(batch.unlabeled_image)
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * poly_lr_factor(step, total, config.optim.poly_power)

            with perf.autocast():
                out = method.train_step(batch, step)
            _check_finite(out, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            if config.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), config.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            method.after_optimizer_step(step)
            completed = step + 1

            for name, value in out.items():
                sums[name] += float(value.detach())
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                n = config.train.log_every if done % config.train.log_every == 0 else done % config.train.log_every
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "lr": optimizer.param_groups[0]["lr"]}
                record.update({k: v / n for k, v in sums.items()})
                record.update(seconds_per_iteration=elapsed / n, data_wait_fraction=data_wait / max(elapsed, 1e-9))
                log.write(record)
                sums.clear()
                window_start, data_wait = time.perf_counter(), 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(out['loss']):.4f}", refresh=False)
            if config.train.val_every and done % config.train.val_every == 0 and done < total:
                validate(done)
            if done % config.train.checkpoint_every == 0 and done < total:
                checkpoint("latest", done)
            if stop.signal_name:
                checkpoint("latest", completed)
                raise CrlnError(
                    f"stopped by {stop.signal_name} after iteration {completed}; checkpoint saved in "
                    f"{folder.path}, continue with --resume"
                )
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()

    validate(total)
    checkpoint("latest", total)
    checkpoint("final", total)
    log.close()  # every record was flushed as written; this only releases the TensorBoard writer
    return TrainResult(
        folder.path,
        total,
        time.perf_counter() - t0,
        None if best["metric"] is None or math.isnan(best["metric"]) else best["metric"],
    )
