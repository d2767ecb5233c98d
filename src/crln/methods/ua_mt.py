"""UA-MT: uncertainty-aware mean teacher.

The teacher makes ``T`` stochastic passes (input noise, and dropout when the network has it) over
each unlabelled patch. The entropy of the mean softmax is the uncertainty. The consistency loss is
a mean squared error between the student's and the teacher's softmax, restricted to voxels whose
uncertainty is below a threshold. The threshold ramps from ``threshold_start`` to ``threshold_end``
(in units of ln C, the largest entropy possible), and the consistency weight ramps up with a
sigmoid.

Reference: Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium
Segmentation", MICCAI 2019 (code: yulequan/UA-MT, `train_LA_meanteacher_certainty_unlabel.py`;
the defaults below are that script's: T = 8, noise N(0, 0.1) clipped to ±0.2, consistency 0.1
ramped over 40 "epochs" of 150 iterations, threshold 0.75 → 1.0 of ln 2 over the whole run).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from crln.data.batch import Batch
from crln.method_configs import UAMTConfig
from crln.methods.base import ModelFactory, TeacherStudentMethod, register_method
from crln.methods.losses import DiceCELoss
from crln.methods.ramps import sigmoid_rampup

__all__ = ["UAMT", "UAMTConfig", "uncertainty_masked_mse"]


def uncertainty_masked_mse(student_probs: Tensor, teacher_probs: Tensor, mask: Tensor) -> Tensor:
    """``sum(mask · (p_s − p_t)²) / (C · sum(mask) + eps)``, the UA-MT consistency.

    Args:
        student_probs: ``(B, C, H, W, D)`` softmax of the student.
        teacher_probs: ``(B, C, H, W, D)`` mean teacher softmax (no gradient).
        mask: ``(B, 1, H, W, D)`` 1 where the teacher is certain enough.
    """
    squared = (student_probs - teacher_probs) ** 2
    channels = student_probs.shape[1]
    return (mask * squared).sum() / (channels * mask.sum() + 1e-16)


@register_method
class UAMT(TeacherStudentMethod):
    """Mean teacher whose consistency is restricted to voxels the teacher is certain about."""

    name = "ua_mt"
    config_class = UAMTConfig

    def __init__(self, config: UAMTConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__(config, model_factory, num_classes)
        self.supervised_loss = DiceCELoss(config.dice_weight, config.ce_weight)

    def _noisy(self, x: Tensor) -> Tensor:
        cfg: UAMTConfig = self.config  # type: ignore[assignment]
        return x + (torch.randn_like(x) * cfg.input_noise_sigma).clamp(-cfg.input_noise_clip, cfg.input_noise_clip)

    @torch.no_grad()
    def teacher_prediction(self, unlabeled: Tensor) -> tuple[Tensor, Tensor]:
        """Mean softmax ``(Bu, C, H, W, D)`` of one noisy teacher pass, and the entropy ``(Bu, 1, H, W, D)``
        of the mean softmax over ``passes`` noisy passes."""
        cfg: UAMTConfig = self.config  # type: ignore[assignment]
        target = torch.softmax(self.teacher(self._noisy(unlabeled)).float(), dim=1)
        # The T passes run as one batch of T·Bu patches (what the authors' script does in chunks).
        stacked = unlabeled.repeat(cfg.passes, *([1] * (unlabeled.ndim - 1)))
        probs = torch.softmax(self.teacher(self._noisy(stacked)).float(), dim=1)
        mean = probs.view(cfg.passes, *unlabeled.shape[:1], *probs.shape[1:]).mean(dim=0)
        entropy = -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)
        return target, entropy

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg: UAMTConfig = self.config  # type: ignore[assignment]
        if batch.unlabeled_image is None:
            raise ValueError("ua_mt needs unlabelled images in the batch")
        n_labeled = batch.labeled_image.shape[0]
        logits = self.student(torch.cat([batch.labeled_image, batch.unlabeled_image], dim=0))
        sup, ce, dice = self.supervised_loss(logits[:n_labeled], batch.labeled_label)

        teacher_probs, uncertainty = self.teacher_prediction(batch.unlabeled_image)
        ramp = sigmoid_rampup(step, cfg.threshold_rampup_iterations)
        threshold = (cfg.threshold_start + (cfg.threshold_end - cfg.threshold_start) * ramp) * math.log(
            self.num_classes
        )
        mask = (uncertainty < threshold).float()
        student_probs = torch.softmax(logits[n_labeled:].float(), dim=1)
        consistency = uncertainty_masked_mse(student_probs, teacher_probs, mask)
        weight = cfg.consistency_weight * sigmoid_rampup(step, cfg.consistency_rampup_iterations)
        return {
            "loss": sup + weight * consistency,
            "loss_sup": sup.detach(),
            "loss_ce": ce.detach(),
            "loss_dice": dice.detach(),
            "loss_unsup": consistency.detach(),
            "unsup_weight": torch.tensor(weight),
            "certain_fraction": mask.mean(),
            "uncertainty_threshold": torch.tensor(threshold),
        }
