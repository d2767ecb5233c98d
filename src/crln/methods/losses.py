"""Loss terms shared by the training methods."""

from __future__ import annotations

import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """Weighted cross-entropy + soft Dice over the foreground classes, the field's supervised loss.

    The Dice term follows the field's VNet scripts (UA-MT, MC-Net, BCP, CRLN): softmax
    probabilities, squared denominators, sums over the whole batch, background excluded, smoothing
    1e-5. MONAI's :class:`~monai.losses.DiceLoss` computes exactly that with ``squared_pred=True,
    batch=True, include_background=False``.

    Args:
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.

    ``forward(logits, target)``: logits ``(B, C, H, W, D)``, target ``(B, H, W, D)`` int64 class
    indices; returns a scalar and the two terms ``(total, ce, dice)``.
    """

    def __init__(self, dice_weight: float = 0.5, ce_weight: float = 0.5) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got dice={dice_weight}, ce={ce_weight}")
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.dice = DiceLoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = logits.float()  # losses in fp32 under autocast
        ce = F.cross_entropy(logits, target)
        dice = self.dice(logits, target.unsqueeze(1))
        return self.ce_weight * ce + self.dice_weight * dice, ce, dice
