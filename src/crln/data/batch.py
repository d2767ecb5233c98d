"""The batch of one training iteration, as the loader yields it and a method's ``train_step`` reads it.

Its own module so that a method can name it without importing the loader (``crln.data.loader``
builds it; ``crln.methods`` only reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """One training step's data.

    Attributes:
        labeled_image: ``(Bl, C, H, W, D)`` float32 (C = 1 for single-channel data).
        labeled_label: ``(Bl, H, W, D)`` int64.
        unlabeled_image: ``(Bu, C, H, W, D)`` float32, or ``None`` when ``Bu = 0``.
        unlabeled_oracle_label: ``(Bu, H, W, D)`` int64 labels of the unlabelled patches when the
            unlabelled cases have labels (LA does) and the trainer loaded them, else ``None``. For
            monitoring pseudo-label quality only; no loss may use it.
        step: the training step this batch belongs to.
        case_indices: case index of each labelled then unlabelled item (provenance, determinism checks).
    """

    labeled_image: torch.Tensor
    labeled_label: torch.Tensor
    unlabeled_image: torch.Tensor | None = None
    unlabeled_oracle_label: torch.Tensor | None = None
    step: int = -1
    case_indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move the tensors to ``device``."""
        return Batch(
            labeled_image=self.labeled_image.to(device, non_blocking=non_blocking),
            labeled_label=self.labeled_label.to(device, non_blocking=non_blocking),
            unlabeled_image=None
            if self.unlabeled_image is None
            else self.unlabeled_image.to(device, non_blocking=non_blocking),
            unlabeled_oracle_label=None
            if self.unlabeled_oracle_label is None
            else self.unlabeled_oracle_label.to(device, non_blocking=non_blocking),
            step=self.step,
            case_indices=list(self.case_indices),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (called by ``DataLoader(pin_memory=True)``)."""
        return Batch(
            labeled_image=self.labeled_image.pin_memory(),
            labeled_label=self.labeled_label.pin_memory(),
            unlabeled_image=None if self.unlabeled_image is None else self.unlabeled_image.pin_memory(),
            unlabeled_oracle_label=None
            if self.unlabeled_oracle_label is None
            else self.unlabeled_oracle_label.pin_memory(),
            step=self.step,
            case_indices=list(self.case_indices),
        )

    @property
    def images(self) -> torch.Tensor:
        """Labelled then unlabelled images concatenated, ``(Bl + Bu, C, H, W, D)``."""
        if self.unlabeled_image is None:
            return self.labeled_image
        return torch.cat([self.labeled_image, self.unlabeled_image])
