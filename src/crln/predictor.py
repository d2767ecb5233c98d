"""A trained network ready to segment: checkpoint → inference network → labels and probabilities.

Every path from a checkpoint to a prediction goes through here: ``crln evaluate`` and ``crln predict``
(:mod:`crln.evaluation`), ``crln report`` and ``benchmarks/bench_inference.py``. A checkpoint is either
a full training checkpoint (``checkpoint_{final,best,latest}.pt``: every network of the method) or an
inference-weights file (``model_final.pt``, written by :func:`crln.engine.state.inference_weights`: the config and the
network of ``eval.network`` only); both give the network the run's ``eval.network`` names (student,
EMA teacher, or CRLN's rectified teacher). A :class:`Predictor` applies the run's own input contract
(``data.intensity``) and sliding-window protocol (``data.patch_size``, ``eval.stride``,
``eval.sw_batch_size``), so a raw scan goes in and a label map comes out.

Example::

    predictor = Predictor.from_checkpoint("runs/la/crln__vnet__default/seed1337/model_final.pt", device="cpu")
    labels, probabilities = predictor.predict(image)  # (H, W, D) uint8, (C, H, W, D) float32
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crln.config import RunConfig, build_config
from crln.data.case import Case
from crln.data.transforms import normalize_intensity
from crln.data.validate import check_channels, validate_case
from crln.engine.checkpoint import INFERENCE_WEIGHTS, load_checkpoint, restore_module_state
from crln.engine.device import Performance, resolve_device, run_settings
from crln.errors import CrlnError
from crln.inference import optimize_for_inference, predict_case, scaled_stride
from crln.methods import Method, method_for_run

__all__ = [
    "Predictor",
    "check_input",
    "inference_stride",
    "method_from_checkpoint",
    "network_from_checkpoint",
    "training_preparation",
]


def check_input(case: Case, config: RunConfig, *, require_label: bool) -> None:
    """Refuse a case the network of ``config`` cannot segment: non-finite voxels, a rank or channel
    count other than ``(H, W, D)`` / ``(model.in_channels, H, W, D)``, labels outside the classes."""
    validate_case(case, num_classes=config.data.num_classes, require_label=require_label, allow_channels=True)
    check_channels(case, config.model.in_channels, " of the checkpoint's network")


def method_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[Method, RunConfig]:
    """Rebuild a method (all its networks, weights loaded) and its config from a full checkpoint dict."""
    config = build_config(checkpoint["config"])
    method = method_for_run(config)
    restore_module_state(method, checkpoint["method_state"])
    return method, config


def network_from_checkpoint(checkpoint: dict[str, Any], network: str | None = None) -> tuple[nn.Module, RunConfig]:
    """The inference network (weights loaded) and config of a full checkpoint or of an inference-weights
    file (``model_final.pt``, :func:`crln.engine.state.inference_weights`).

    ``network`` (student, teacher, teacher_rectified) overrides the run's ``eval.network``, and the config
    returned then says so; an inference-weights file holds the run's ``eval.network`` only.
    """
    config = build_config(checkpoint["config"])
    which = network or config.eval.network
    if checkpoint.get("contents") == INFERENCE_WEIGHTS:
        if which != config.eval.network:
            raise CrlnError(
                f"holds only the {config.eval.network!r} network (eval.network of the run), not {which!r}; "
                "a full checkpoint_*.pt has every network"
            )
        # Build the method's networks (freshly initialised) only to give the eval.network its structure.
        method = method_for_run(config)
        module = method.inference_network(which)
        restore_module_state(module, checkpoint["method_state"])
        return module, config
    method, config = method_from_checkpoint(checkpoint)
    module = method.inference_network(which)
    config.eval.network = which
    return module, config


def _recorded(key: str, run_dir: Path | None, recorded: dict[str, Any] | None) -> tuple[bool, Any]:
    """``(found, value)`` of a :func:`crln.data.prepare.training_data_record` key: from the checkpoint's
    own record (``recorded``), else the run's ``meta.json`` (neither in a checkpoint copied away from an
    older run)."""
    sources = [recorded or {}]
    meta_path = run_dir / "meta.json" if run_dir is not None else None
    if meta_path is not None and meta_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            sources.append(json.loads(meta_path.read_text()))
    for source in sources:
        if isinstance(source, dict) and key in source:
            return True, source[key]
    return False, None


def _training_scale(config: RunConfig, run_dir: Path | None, recorded: dict[str, Any] | None) -> float:
    """The scale of the data the network was trained on: recorded at training (checkpoint or ``meta.json``),
    else that of ``data.root`` when the folder is here, else 1."""
    from crln.data.prepare import recorded_scale

    found, scale = _recorded("data_scale", run_dir, recorded)
    if found and isinstance(scale, int | float) and scale > 0:
        return float(scale)
    root = Path(config.data.root)
    return recorded_scale(root) if root.is_dir() else 1.0


def training_preparation(
    config: RunConfig, run_dir: Path | None, recorded: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ``crln data prepare`` pipeline behind the training data (:func:`crln.data.prepare.recorded_preparation`):
    recorded at training (``recorded``: :attr:`Predictor.training_data`, or the run's ``meta.json``), else
    read from ``data.root`` when the folder is here."""
    from crln.data.prepare import recorded_preparation

    found, preparation = _recorded("data_preparation", run_dir, recorded)
    return preparation if found else recorded_preparation(config.data.root)


def inference_stride(
    config: RunConfig,
    stride: tuple[int, int, int] | None,
    data_path: str | Path,
    run_dir: Path | None,
    recorded: dict[str, Any] | None = None,
) -> tuple[tuple[int, int, int], str | None]:
    """The sliding-window stride for the data at ``data_path``, and a note when it is not ``eval.stride``.

    An explicit ``stride`` (``--stride``) wins. Otherwise ``eval.stride`` is the stride for the data the
    run was trained on; when the data predicted now has another scale (``crln data prepare --scale``
    records it, see :func:`crln.data.prepare.recorded_scale`), the stride is multiplied by the ratio of
    the scales (:func:`crln.inference.scaled_stride`): a stride meant for 0.5-scale data would
    otherwise run about 8 times the field's windows on full-resolution data. ``recorded`` is the
    checkpoint's own record of its training data (:attr:`Predictor.training_data`).

    Raises:
        CrlnError: ``stride`` is not 3 integers between 1 and the patch.
    """
    from crln.data.prepare import recorded_scale

    patch = tuple(int(p) for p in config.data.patch_size)
    if stride is not None:
        if len(stride) != 3 or any(not 1 <= s <= p for s, p in zip(stride, patch)):
            raise CrlnError(f"--stride: expected 3 integers between 1 and the patch {list(patch)}, got {list(stride)}")
        return tuple(int(s) for s in stride), None  # type: ignore[return-value]
    preset = tuple(int(s) for s in config.eval.stride)
    trained, now = _training_scale(config, run_dir, recorded), recorded_scale(data_path)
    if math.isclose(trained, now, rel_tol=1e-3):
        return preset, None  # type: ignore[return-value]
    scaled = scaled_stride(preset, patch, now / trained)
    note = (
        f"eval.stride {list(preset)} is for the training data's scale {trained:g}; {data_path} is at scale "
        f"{now:g}, so the stride is {list(scaled)} (set it with --stride)"
    )
    return scaled, note


@dataclass
class Predictor:
    """The inference network of a run with the run's input contract and sliding-window protocol.

    Attributes:
        network: the ``eval.network`` in eval mode on ``perf.device``, prepared forward-only by
            :func:`crln.inference.optimize_for_inference` (never train it).
        config: the run's resolved config (from the checkpoint).
        perf: device, autocast dtype and memory format of the forward passes.
        step: training iterations behind the weights.
        method_name: ``method.name`` of the run.
        method: the whole trained method (every network, eval mode) when the checkpoint is a full one
            and ``with_method`` was asked; ``None`` otherwise.
        run_network: the run's own ``eval.network`` (``config.eval.network`` is the one predicting, which
            ``from_checkpoint(network=...)`` may have changed).
        training_data: what ``model_final.pt`` records of the training data
            (:func:`crln.data.prepare.training_data_record`; ``{}`` for a full checkpoint, whose run folder's
            ``meta.json`` says it).
    """

    network: nn.Module
    config: RunConfig
    perf: Performance
    step: int
    method_name: str
    method: Method | None = field(default=None, repr=False)
    run_network: str = "student"
    training_data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        *,
        amp: str | None = None,
        channels_last: str | None = None,
        with_method: bool = False,
        network: str | None = None,
    ) -> Predictor:
        """Load a checkpoint or ``model_final.pt`` and prepare its ``eval.network`` on ``device``.

        Args:
            path: a checkpoint file written by ``crln train``.
            device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a :class:`torch.device`.
            amp: autocast setting (``auto``, ``none``, ``bf16``, ``fp16``); default the run's ``train.amp``.
            channels_last: memory format (``auto``, ``on``, ``off``); default the run's ``train.channels_last``.
            with_method: also keep the whole method (:attr:`method`; needs a full checkpoint).
            network: the network to predict with (student, teacher, teacher_rectified), instead of the
                run's ``eval.network``; a full checkpoint holds all of the method's, ``model_final.pt`` one.

        Raises:
            CrlnError: not a readable checkpoint, a config or weights inside that do not fit (named with
                the file), a bad device, or ``with_method`` on an inference-weights file.
        """
        path = Path(path)
        dev = device if isinstance(device, torch.device) else resolve_device(device, "--device")
        state = load_checkpoint(path, map_location="cpu")
        method = None
        try:
            if with_method:
                if state.get("contents") == INFERENCE_WEIGHTS:
                    raise CrlnError("holds the inference network only; a full checkpoint_*.pt is needed here")
                method, config = method_from_checkpoint(state)
                method = method.to(dev).eval()
                config.eval.network = network or config.eval.network
                module = method.inference_network(config.eval.network)
            else:
                module, config = network_from_checkpoint(state, network)
        except CrlnError as err:  # a bad config or mismatched weights inside: name the file
            raise CrlnError(f"checkpoint {path}: {err}") from err
        perf = Performance.for_device(dev, amp or config.train.amp, channels_last or config.train.channels_last)
        module = optimize_for_inference(module.to(dev).eval(), dev)
        if perf.channels_last:
            module = module.to(memory_format=torch.channels_last_3d)
        run_network = str(state["config"].get("eval", {}).get("network", "student"))
        training_data = dict(state.get("training_data") or {})
        return cls(module, config, perf, int(state["step"]), str(state["method"]), method, run_network, training_data)

    @property
    def device(self) -> torch.device:
        return self.perf.device

    def predict(
        self,
        image: np.ndarray | Tensor,
        *,
        stride: Sequence[int] | None = None,
        sw_batch_size: int | None = None,
        largest_component: bool = False,
    ) -> tuple[np.ndarray, Tensor]:
        """Segment one volume as the run was trained to see it.

        The image is normalised by the run's ``data.intensity`` (so a raw scan is right as it is), then
        :func:`crln.inference.predict_case` runs the sliding window, argmax and optional post-processing.

        Args:
            image: ``(H, W, D)`` or ``(C_in, H, W, D)`` volume (a tensor becomes a float32 CPU array first).
            stride: window step per axis; default the run's ``eval.stride``
                (:func:`inference_stride` adapts it to data at another scale).
            sw_batch_size: windows per forward pass; default the run's ``eval.sw_batch_size``.
            largest_component: keep only the largest connected component of each foreground class.

        Returns:
            ``(labels, probabilities)``: ``(H, W, D)`` uint8 class indices and ``(C, H, W, D)`` float32
            CPU softmax probabilities (summing to 1 over C).

        Raises:
            CrlnError: an image the network cannot take (:func:`check_input`: rank, channels, non-finite or
                absurd voxels, an empty axis), a bad stride or batch size (see
                :func:`crln.inference.sliding_window_predict`).
        """
        config = self.config
        if isinstance(image, Tensor):  # the intensity modes are numpy code
            image = image.detach().to("cpu", torch.float32).numpy()
        image = np.asarray(image)
        # An in-memory image is checked as the CLI checks a file: otherwise torch fails on the channels, and
        # NaNs come out as a silent label map.
        check_input(Case("image", image, source="predict"), config, require_label=False)
        with run_settings():  # cuDNN autotuning and TF32 for this call only: the caller's own code keeps its flags
            self.perf.apply_cuda_tuning()
            return predict_case(
                lambda x: self.network(self.perf.input(x)),
                normalize_intensity(image, config.data.intensity),
                patch_size=config.data.patch_size,
                stride=tuple(stride) if stride is not None else tuple(config.eval.stride),
                num_classes=config.data.num_classes,
                sw_batch_size=sw_batch_size if sw_batch_size is not None else config.eval.sw_batch_size,
                device=self.perf.device,
                amp_dtype=self.perf.amp_dtype,
                largest_component=largest_component,
            )
