"""Mixed precision, channels-last and the CUDA-only paths.

On CPU (always): bf16 autocast for one training step of every method and for sliding-window
inference (argmax agreement with fp32 on a trained phantom network), the GradScaler path with fp16
through the trainer, and channels-last on every network. Marked ``cuda`` (``pytest -m cuda``, run
by ``benchmarks/gpu_check.py`` on a lent GPU; skipped with a reason elsewhere): the same on CUDA,
cuDNN's settings, and a one-process NCCL group driving a DistributedDataParallel step.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from crln.config import load_config
from crln.data.batch import Batch
from crln.engine.checkpoint import load_checkpoint
from crln.engine.device import Performance, run_settings, seed_everything
from crln.engine.run_folder import read_log
from crln.engine.trainer import train
from crln.methods import build_method, method_config_class, method_names
from crln.models import MODELS, build_model
from crln.predictor import Predictor

CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: run on a lent device (benchmarks/gpu_check.py)")
PATCH = (32, 16, 16)  # the smallest that keeps two values per channel at the VNet's bottleneck
MIN_ARGMAX_AGREEMENT = 0.99
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, needs_cuda])]
# Lighter settings of the costly parts (UA-MT's teacher passes, CRLN's contrastive sampling): same code paths.
METHOD_OVERRIDES = {"ua_mt": {"passes": 2}, "crln": {"num_prototypes": 4, "num_anchors": 16, "num_negatives": 32}}


def _batch(device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(0)
    label = torch.zeros(2, *PATCH, dtype=torch.int64)
    label[:, 8:24, 4:12, 4:12] = 1
    image = torch.randn(2, 1, *PATCH, generator=generator) * 0.3 + label[:, None].float()
    return Batch(image, label, torch.randn(2, 1, *PATCH, generator=generator)).to(device)


def _one_step(name: str, device: torch.device, amp: str, channels_last: str) -> tuple[dict[str, float], bool]:
    """One engine step (autocast forward, scaled backward, SGD, after-step); the loss terms and finite grads."""
    seed_everything(0)
    perf = Performance.for_device(device, amp, channels_last)
    config = method_config_class(name)(name=name, **METHOD_OVERRIDES.get(name, {}))
    method = perf.place(build_method(config, lambda: build_model("vnet", **_net_args()), 2)).train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=perf.amp_dtype == torch.float16)
    batch = _batch(device)
    batch.labeled_image, batch.unlabeled_image = perf.input(batch.labeled_image), perf.input(batch.unlabeled_image)
    step = 1000  # past CRLN's S = 800: its rectification runs too
    with perf.autocast():
        out = method.train_step(batch, step)
    scaler.scale(out["loss"]).backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in method.trainable_parameters() if p.grad is not None)
    scaler.step(optimizer)
    scaler.update()
    method.after_optimizer_step(step)
    return {k: float(v.detach()) for k, v in out.items() if v.numel() == 1}, bool(grads_finite)


def _net_args() -> dict[str, object]:
    return {"in_channels": 1, "num_classes": 2, "n_filters": 4, "normalization": "batchnorm", "dropout": 0.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", method_names())
def test_bf16_training_step_of_every_method_is_finite_and_close_to_fp32(name: str, device: str) -> None:
    dev = torch.device(device)
    fp32, _ = _one_step(name, dev, "none", "off")
    bf16, grads_finite = _one_step(name, dev, "bf16", "on")
    assert grads_finite and all(np.isfinite(v) for v in bf16.values()), bf16
    # bf16 keeps 8 bits of mantissa: the total loss of the same batch and weights agrees to a few percent
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.1), (bf16, fp32)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_grad_scaler_trains_through_the_engine(phantom_root: Path, tmp_path: Path, device: str) -> None:
    probe = torch.nn.Conv3d(1, 1, 3).to(device)
    try:
        with torch.autocast(device, dtype=torch.float16):
            probe(torch.randn(1, 1, 4, 4, 4, device=device))
    except RuntimeError as err:  # older CPU builds have no fp16 autocast for 3D convolutions
        pytest.skip(f"fp16 autocast of conv3d is not supported on {device} by torch {torch.__version__}: {err}")
    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.amp": "fp16", "train.device": device})
    result = train(load_config("demo", [*overrides, "train.iterations=3", "data.validation=0"]), progress=False)
    losses = [r["loss"] for r in read_log(result.run_dir / "log.jsonl") if "loss" in r]
    assert losses and all(np.isfinite(losses))
    scaler = load_checkpoint(result.run_dir / "checkpoint_final.pt")["scaler"]
    assert scaler and scaler["scale"] > 0  # the GradScaler was active and its state is saved for resuming


@pytest.fixture(scope="module")
def trained_phantom(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supervised VNet trained briefly on the phantoms (fp32, CPU): its predictions are not ties."""
    out = tmp_path_factory.mktemp("mixed_precision_run")
    extra = {"train.iterations": 15, "train.log_every": 5, "train.checkpoint_every": 15, "data.validation": 0}
    overrides = tiny_overrides(phantom_root, out, **extra, **{"train.device": "cpu"})
    return train(load_config("demo", overrides), progress=False).run_dir / "checkpoint_final.pt"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_sliding_window_agrees_with_fp32(trained_phantom: Path, phantom_root: Path, device: str) -> None:
    from crln.data.h5 import H5Dataset

    dev = torch.device(device)
    image = H5Dataset(phantom_root).load(H5Dataset(phantom_root).ids("test")[0], with_label=False).image
    labels, probs = {}, {}
    for amp, layout in (("none", "off"), ("bf16", "on")):
        predictor = Predictor.from_checkpoint(trained_phantom, dev, amp=amp, channels_last=layout)
        assert predictor.perf.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
        labels[amp], probs[amp] = predictor.predict(image)
    assert torch.isfinite(probs["bf16"]).all()
    assert 0 < labels["none"].sum() < labels["none"].size  # a real segmentation, not all one class
    assert (labels["none"] == labels["bf16"]).mean() >= MIN_ARGMAX_AGREEMENT
    assert float((probs["none"] - probs["bf16"]).abs().max()) < 0.2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_gives_the_same_logits_and_trains(name: str, device: str) -> None:
    dev = torch.device(device)
    torch.manual_seed(0)
    network = build_model(name, **_net_args()).to(dev).eval()
    x = torch.randn(2, 1, *PATCH, device=dev)
    perf = Performance.for_device(dev, "none", "on")
    with torch.no_grad():
        reference = network(x)
        placed = perf.place(network)
        logits = placed(perf.input(x))
    tolerance = 1e-4 if dev.type == "cpu" else 1e-2  # CUDA: TF32 convolutions (Performance enables them)
    torch.testing.assert_close(logits.contiguous(), reference, atol=tolerance, rtol=tolerance)
    placed.train()
    loss = placed(perf.input(x)).float().logsumexp(1).mean()
    loss.backward()
    conv = next(p for p in placed.parameters() if p.ndim == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(torch.isfinite(p.grad).all() for p in placed.parameters() if p.grad is not None)


@cuda
@needs_cuda
def test_cudnn_is_used_with_the_speed_settings_and_off_when_deterministic() -> None:
    assert torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    torch.backends.cudnn.benchmark = False
    with run_settings():
        Performance.for_device(torch.device("cuda")).apply_cuda_tuning()
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark  # the process's own flags again
    x = torch.randn(1, 1, 16, 16, 16, device="cuda", dtype=torch.bfloat16)
    assert torch.backends.cudnn.is_acceptable(x)
    try:
        seed_everything(0, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@cuda
@needs_cuda
def test_one_process_nccl_group_runs_a_data_parallel_step() -> None:
    import torch.distributed as dist

    from crln.engine import distributed

    if not dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        value = torch.ones(3, device=device)
        dist.all_reduce(value)
        assert value.tolist() == [1.0, 1.0, 1.0]
        seed_everything(0)
        config = method_config_class("mean_teacher")(name="mean_teacher")
        method = build_method(config, lambda: build_model("vnet", **_net_args()), 2).to(device).train()
        step = distributed.wrap_for_data_parallel(method, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(_batch(device), 0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and method.student.training
        assert all(p.grad is not None for p in method.trainable_parameters())
    finally:
        dist.destroy_process_group()
