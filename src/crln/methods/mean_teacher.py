"""Mean teacher with weak→strong consistency: the base of CRLN (paper Sec. 3.1, eq. 1–2).

The teacher is an EMA of the student and never receives gradients. The teacher sees the weak view
of the unlabelled batch (random crop, rot/flip: what the loader gives). The student sees the strong
view: the weak view plus Gaussian noise and, optionally, a 3D CutMix box exchanged between the
unlabelled samples of the batch. The teacher's pseudo-labels are mixed with the same box, so they
stay aligned with the student's input (the paper's A_g). The unsupervised term is eq. 2: a
negative log-likelihood on the voxels whose pseudo-label confidence is ≥ τ.

Reference: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017;
Wang et al., "Cooperative Rectification Learning Network", Medical Image Analysis 2025, eq. 1–2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crln.data.batch import Batch
from crln.method_configs import MeanTeacherConfig
from crln.methods.base import ModelFactory, TeacherStudentMethod, register_method
from crln.methods.losses import DiceCELoss
from crln.methods.ramps import sigmoid_rampup
from crln.methods.strong_view import authors_strong_view

__all__ = ["MeanTeacher", "MeanTeacherConfig", "consistency_terms", "cutmix_box_mask", "masked_nll"]


def cutmix_box_mask(
    shape: tuple[int, int, int],
    fraction: float,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """One random box per sample: ``(B, 1, H, W, D)`` float mask, 1 inside the box.

    Each box side is ``round(fraction * side)``, at a uniformly random position inside the patch.
    """
    mask = torch.zeros(batch, 1, *shape, device=device)
    sizes = [max(1, round(fraction * s)) for s in shape]
    for b in range(batch):
        starts = [int(torch.randint(0, s - k + 1, (1,), generator=generator)) for s, k in zip(shape, sizes)]
        (h, w, d), (kh, kw, kd) = starts, sizes
        mask[b, :, h : h + kh, w : w + kw, d : d + kd] = 1.0
    return mask


def consistency_terms(
    loss: Tensor, supervised: tuple[Tensor, Tensor, Tensor], unsup: Tensor, weight: float, reliable: Tensor
) -> dict[str, Tensor]:
    """The named terms every weak→strong method logs: total (with grad), supervised (total, CE, Dice),
    unsupervised term, its weight and the reliable pseudo-label fraction (all detached)."""
    sup, ce, dice = supervised
    return {
        "loss": loss,
        "loss_sup": sup.detach(),
        "loss_ce": ce.detach(),
        "loss_dice": dice.detach(),
        "loss_unsup": unsup.detach(),
        "unsup_weight": torch.tensor(weight),
        "reliable_fraction": reliable.detach(),
    }


def masked_nll(student_logits: Tensor, pseudo_probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Eq. 2: NLL of the pseudo-label's argmax on voxels with confidence ≥ ``threshold``.

    Args:
        student_logits: ``(B, C, H, W, D)`` logits of the strong view.
        pseudo_probs: ``(B, C, H, W, D)`` teacher probabilities aligned with the strong view.
        threshold: τ.

    Returns:
        ``(loss, reliable_fraction)``; the loss is averaged over all voxels (|Ω|), as in eq. 2.
    """
    confidence, target = pseudo_probs.max(dim=1)
    mask = (confidence >= threshold).float()
    nll = F.cross_entropy(student_logits.float(), target, reduction="none")
    return (nll * mask).mean(), mask.mean()


@register_method
class MeanTeacher(TeacherStudentMethod):
    """Student/teacher pair with EMA, weak→strong consistency, optional CutMix and noise."""

    name = "mean_teacher"
    config_class = MeanTeacherConfig

    def __init__(self, config: MeanTeacherConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__(config, model_factory, num_classes)
        self.supervised_loss = DiceCELoss(config.dice_weight, config.ce_weight)

    def strong_view(self, weak: Tensor, pseudo_probs: Tensor) -> tuple[Tensor, Tensor]:
        """Noise + CutMix of the unlabelled weak view ``(Bu, 1, H, W, D)``, with aligned pseudo-labels."""
        cfg: MeanTeacherConfig = self.config  # type: ignore[assignment]
        if cfg.strong_view == "authors":
            return authors_strong_view(weak, pseudo_probs, cutmix=cfg.cutmix)
        strong = weak
        if cfg.strong_noise_sigma > 0:
            noise = torch.randn_like(weak) * cfg.strong_noise_sigma
            strong = weak + noise.clamp(-cfg.strong_noise_clip, cfg.strong_noise_clip)
        if cfg.cutmix and weak.shape[0] > 1:
            box = cutmix_box_mask(tuple(weak.shape[2:]), cfg.cutmix_box_fraction, weak.shape[0], device=weak.device).to(
                weak.dtype
            )
            # Sample b receives a box from sample b+1 (cyclic), in the input and in the pseudo-label.
            strong = strong * (1 - box) + strong.roll(1, dims=0) * box
            pseudo_probs = pseudo_probs * (1 - box) + pseudo_probs.roll(1, dims=0) * box
        return strong, pseudo_probs

    def student_forward(self, labeled: Tensor, strong: Tensor, return_features: bool = False) -> Any:
        """Student logits ``(Bl + Bu, C, H, W, D)`` of [labelled, strong unlabelled] (and, with
        ``return_features``, the decoder features, concatenated the same way)."""
        kwargs = {"return_features": True} if return_features else {}
        if not self.config.separate_forward:  # type: ignore[attr-defined]
            return self.student(torch.cat([labeled, strong], dim=0), **kwargs)
        first, second = self.student(labeled, **kwargs), self.student(strong, **kwargs)
        if not return_features:
            return torch.cat([first, second], dim=0)
        feats = {key: torch.cat([first[1][key], second[1][key]], dim=0) for key in first[1]}
        return torch.cat([first[0], second[0]], dim=0), feats

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg: MeanTeacherConfig = self.config  # type: ignore[assignment]
        if batch.unlabeled_image is None:
            raise ValueError("mean_teacher needs unlabelled images in the batch")
        with torch.no_grad():
            pseudo = torch.softmax(self.teacher(batch.unlabeled_image).float(), dim=1)
        strong, pseudo = self.strong_view(batch.unlabeled_image, pseudo)

        n_labeled = batch.labeled_image.shape[0]
        logits = self.student_forward(batch.labeled_image, strong)
        sup, ce, dice = self.supervised_loss(logits[:n_labeled], batch.labeled_label)
        unsup, reliable = masked_nll(logits[n_labeled:], pseudo, cfg.confidence_threshold)
        weight = cfg.unsup_weight * sigmoid_rampup(step, cfg.rampup_iterations)
        return consistency_terms(sup + weight * unsup, (sup, ce, dice), unsup, weight, reliable)
