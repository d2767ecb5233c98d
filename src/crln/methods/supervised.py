"""Supervised baseline: the labelled cases only, Dice + cross-entropy."""

from __future__ import annotations

from torch import Tensor

from crln.data.batch import Batch
from crln.method_configs import SupervisedConfig
from crln.methods.base import Method, ModelFactory, register_method
from crln.methods.losses import DiceCELoss

__all__ = ["Supervised", "SupervisedConfig"]


@register_method
class Supervised(Method):
    """Train the student on labelled patches only; the unlabelled stream is not loaded."""

    name = "supervised"
    config_class = SupervisedConfig
    uses_unlabeled = False

    def __init__(self, config: SupervisedConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__(config, model_factory, num_classes)
        self.supervised_loss = DiceCELoss(config.dice_weight, config.ce_weight)

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        logits = self.student(batch.labeled_image)
        loss, ce, dice = self.supervised_loss(logits, batch.labeled_label)
        return {"loss": loss, "loss_ce": ce.detach(), "loss_dice": dice.detach()}
