"""Device selection and the CUDA speed settings, switched on in one place."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crln.errors import CrlnError

__all__ = ["Performance", "resolve_device", "run_settings", "seed_everything"]


def resolve_device(name: str, option: str = "config key train.device") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device, checked.

    ``option`` is what the user set it with (``--device`` on the command line), named in the error.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CrlnError(f"{option}: expected auto, cpu or cuda[:N], got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrlnError(f"{option}: {name!r} requested but CUDA is not available; use cpu")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` asks torch for reproducible kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


@contextlib.contextmanager
def run_settings(threads: int = 0) -> Iterator[None]:
    """Within: ``threads`` CPU threads (``train.threads``; 0 keeps the process's). After: the thread count,
    deterministic-kernel, cuDNN and TF32 settings the process had before (which a run's seeding and
    :meth:`Performance.for_device` set process-wide): in a notebook, the next run and the user's own code
    get what they had, not the last run's ``train.threads`` or ``train.deterministic``."""
    saved_threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = flags


@dataclass(frozen=True)
class Performance:
    """Autocast dtype and memory format for one device.

    ``auto`` settings give bf16 autocast + ``channels_last_3d`` + cudnn.benchmark on CUDA, and fp32 +
    ``channels_last_3d`` on CPU (CPU autocast is slower for 3D convolutions; the channels-last layout
    made every method's CPU training step 1.1–1.2× faster, ``benchmarks/RESULTS.md``).
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    cuda_tuning: bool = False  # cuDNN autotuning and TF32 while crln computes (CUDA, not deterministic)

    @classmethod
    def for_device(
        cls, device: torch.device, amp: str = "auto", channels_last: str = "auto", deterministic: bool = False
    ) -> Performance:
        cuda = device.type == "cuda"
        dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        amp_dtype = (torch.bfloat16 if cuda else None) if amp == "auto" else dtypes[amp]
        use_cl = channels_last in ("auto", "on")
        return cls(device=device, amp_dtype=amp_dtype, channels_last=use_cl, cuda_tuning=cuda and not deterministic)

    def apply_cuda_tuning(self) -> None:
        """Switch cuDNN autotuning and TF32 on when ``cuda_tuning`` says so. They are process-wide flags: call
        it within :func:`run_settings`, which gives the caller's code its own flags back afterwards."""
        if self.cuda_tuning:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op when AMP is off)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def place(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device (and to channels_last_3d when enabled)."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last_3d)
        return module

    @staticmethod
    def compile_networks(module: nn.Module, backend: str = "inductor") -> None:
        """``torch.compile`` each network ``module`` owns (its direct children with weights), in place.

        In place (``nn.Module.compile``) so the weights, their names in checkpoints and the EMA's view of
        them stay as they are; only the forward passes run compiled (``train.compile``).
        """
        for child in module.children():
            if any(True for _ in child.parameters()):
                child.compile(backend=backend)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Match an input batch ``(B, C, H, W, D)`` to the networks' memory format."""
        if self.channels_last and x.ndim == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x
