"""BCP: bidirectional copy-paste (Bai et al., CVPR 2023), two stages over the shared engine.

Stage 1, pre-training (iterations ``0 … pretrain_iterations − 1``): labelled data only. The
labelled batch is split in halves a and b; one cube (side ``cube_fraction`` of each patch side, the
same cube for every sample of the iteration) of b is pasted into a, image and label alike, and the
student is trained on the mixed volumes with ``dice_weight``·Dice + ``ce_weight``·CE.

Stage 2, self-training (the rest): at the boundary the teacher becomes a copy of the pre-trained
student and the engine gives the optimiser a fresh state and restarts the LR schedule (as the BCP
code builds a new optimiser and loads the pre-trained weights into both networks). Per iteration:

- the EMA teacher labels the unlabelled halves u_a and u_b (argmax, then, with
  ``largest_component``, the largest connected component of each foreground class);
- one cube ``M``; ``mix_l`` = labelled a outside the cube, unlabelled a inside;
  ``mix_u`` = unlabelled b outside, labelled b inside; their targets are mixed the same way from the
  ground truth and the pseudo-labels, so every voxel keeps the label of the volume it came from;
- the student sees both mixed volumes (one forward each); every voxel's loss weight is 1 where its
  target is ground truth and ``unlabeled_weight`` where it is a pseudo-label;
- after the optimiser step: ``teacher ← d·teacher + (1 − d)·student`` with constant ``d = ema_decay``.

The Dice of both stages is BCP's: softmax probabilities, plain (not squared) sums, one score per
sample and class, background included, averaged; restricted to a region by a voxel mask. The CE of
a region is its voxel mean. Every difference from the authors' code is listed in ``docs/bcp.md``.

Reference: Bai, Chen, Li, Shen, Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023; code ``DeepMed-Lab-ECNU/BCP`` (``code/LA_BCP_train.py``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crln.data.batch import Batch
from crln.method_configs import BCPConfig, MethodConfig
from crln.methods.base import StageStart, TeacherStudentMethod, TimelineMark, register_method
from crln.methods.ema import ema_update
from crln.methods.mean_teacher import consistency_terms, cutmix_box_mask
from crln.metrics import keep_largest_component

__all__ = ["BCP", "BCPConfig", "copy_paste_cube", "largest_component_labels", "region_dice_ce"]

_SMOOTH = 1e-5  # the Dice smoothing of BCP's mask_DiceLoss


def copy_paste_cube(shape: tuple[int, int, int], fraction: float, device: torch.device | None = None) -> Tensor:
    """One random cube for the whole batch: ``(H, W, D)`` bool, True inside.

    Side ``round(fraction · side)`` per axis at a uniformly random position (torch's global RNG, so a
    resumed run draws the same cubes); :func:`crln.methods.mean_teacher.cutmix_box_mask` draws it.
    """
    return cutmix_box_mask(shape, fraction, 1, device=device)[0, 0].bool()


@torch.no_grad()
def largest_component_labels(labels: Tensor) -> Tensor:
    """Per sample and foreground class, keep the largest 26-connected component; the rest becomes background.

    Args:
        labels: ``(B, H, W, D)`` int64 class indices (pseudo-labels).

    Returns:
        Filtered labels of the same shape, dtype and device (:func:`crln.metrics.keep_largest_component`).
    """
    array = labels.cpu().numpy()
    out = np.zeros_like(array)
    for b, sample in enumerate(array):
        for c in np.unique(sample):
            if c != 0:
                out[b][keep_largest_component(sample == c)] = c
    return torch.from_numpy(out).to(labels.device)


def region_dice_ce(logits: Tensor, target: Tensor, region: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BCP's Dice loss and cross-entropy restricted to ``region`` (the whole volume when None).

    Args:
        logits: ``(B, C, H, W, D)``.
        target: ``(B, H, W, D)`` int64.
        region: ``(H, W, D)`` or ``(B, H, W, D)`` bool/float voxel mask.

    Returns:
        ``(dice, ce)``: 1 − mean over samples and classes (background included) of
        ``(2·Σ p·t + ε) / (Σ (p + t) + ε)`` over the region, and the mean CE over the region's voxels.
    """
    logits = logits.float()  # losses in fp32 under autocast
    weight = torch.ones_like(target, dtype=torch.float32) if region is None else region.float().expand_as(target)
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    w = weight.unsqueeze(1)
    inter = (probs * onehot * w).flatten(2).sum(2)
    union = ((probs + onehot) * w).flatten(2).sum(2)
    dice = 1.0 - ((2.0 * inter + _SMOOTH) / (union + _SMOOTH)).mean()
    ce = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / (weight.sum() + 1e-16)
    return dice, ce


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """The first and second half of a batch along dim 0 (BCP's a and b sub-batches)."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


@register_method
class BCP(TeacherStudentMethod):
    """Bidirectional copy-paste: labelled copy-paste pre-training, then mean-teacher self-training."""

    name = "bcp"
    config_class = BCPConfig
    #: Both halves of each stream must pair up: labelled batch even, unlabelled batch equal to it.
    batch_rule: ClassVar[str] = "data.labeled_batch_size even and data.unlabeled_batch_size equal to it"

    @property
    def cfg(self) -> BCPConfig:
        return self.config  # type: ignore[return-value]

    def stage_starts(self) -> tuple[StageStart, ...]:
        """Self-training starts at ``pretrain_iterations``; ``restart_optimizer``: fresh optimiser and LR schedule."""
        if self.cfg.pretrain_iterations == 0:
            return ()
        restart = self.cfg.restart_optimizer
        return (StageStart(self.cfg.pretrain_iterations, reset_optimizer=restart, restart_lr_schedule=restart),)

    @classmethod
    def report_facts(cls, config: MethodConfig) -> list[tuple[str, str]]:
        cfg: BCPConfig = config  # type: ignore[assignment]
        return [("self-training starts", f"iteration {cfg.pretrain_iterations}")]

    @classmethod
    def timeline_marks(cls, config: MethodConfig) -> tuple[TimelineMark, ...]:
        cfg: BCPConfig = config  # type: ignore[assignment]
        if cfg.pretrain_iterations == 0:
            return ()
        step = cfg.pretrain_iterations
        return (TimelineMark(step, "self-training", f"self-training starts (iteration {step})"),)

    @torch.no_grad()
    def start_stage(self, step: int) -> None:
        """Teacher ← the pre-trained student (parameters and buffers), as the code loads one checkpoint into both."""
        for t, s in zip(self.teacher.state_dict().values(), self.student.state_dict().values(), strict=True):
            t.copy_(s)

    def self_training(self, step: int) -> bool:
        """True from the first self-training iteration on."""
        return step >= self.cfg.pretrain_iterations

    def weighted_loss(self, dice: Tensor, ce: Tensor) -> Tensor:
        return self.cfg.dice_weight * dice + self.cfg.ce_weight * ce

    def pseudo_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher labels ``(B, H, W, D)`` of unlabelled images, and the fraction of foreground the filter removed."""
        raw = self.teacher(images).argmax(dim=1)
        if not self.cfg.largest_component:
            return raw, torch.zeros((), device=images.device)
        kept = largest_component_labels(raw)
        foreground = (raw > 0).sum()
        removed = (foreground - (kept > 0).sum()).float() / foreground.clamp_min(1)
        return kept, removed

    @staticmethod
    def pretraining_mix(batch: Batch, cube: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: labelled a with the cube ``(H, W, D)`` of labelled b pasted in: ``(Bl/2, 1, H, W, D)``, labels."""
        (img_a, img_b), (lab_a, lab_b) = _halves(batch.labeled_image), _halves(batch.labeled_label)
        return torch.where(cube[None, None], img_b, img_a), torch.where(cube, lab_b, lab_a)

    @staticmethod
    def mixed_batches(batch: Batch, cube: Tensor, pseudo: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """BCP's two mixed volumes and their targets (``(B/2, 1, H, W, D)`` and ``(B/2, H, W, D)``).

        ``mix_l``: labelled a outside the cube, unlabelled a inside; ``mix_u``: unlabelled b outside,
        labelled b inside. Targets follow the image: ground truth where the labelled volume shows.
        """
        (img_a, img_b), (lab_a, lab_b) = _halves(batch.labeled_image), _halves(batch.labeled_label)
        unimg_a, unimg_b = _halves(batch.unlabeled_image)  # type: ignore[arg-type]
        plab_a, plab_b = pseudo
        image_cube = cube[None, None]
        return {
            "mix_l": torch.where(image_cube, unimg_a, img_a),
            "mix_l_target": torch.where(cube, plab_a, lab_a),
            "mix_u": torch.where(image_cube, img_b, unimg_b),
            "mix_u_target": torch.where(cube, lab_b, plab_b),
        }

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        n_labeled = batch.labeled_image.shape[0]
        if n_labeled < 2 or n_labeled % 2:
            raise ValueError(f"bcp needs {self.batch_rule}; got a labelled batch of {n_labeled}")
        if self.self_training(step):
            return self.self_training_step(batch)
        return self.pretraining_step(batch)

    def pretraining_step(self, batch: Batch) -> dict[str, Tensor]:
        """Stage 1: a cube of labelled b pasted into labelled a, image and label alike."""
        shape = tuple(batch.labeled_image.shape[2:])
        cube = copy_paste_cube(shape, self.cfg.cube_fraction, device=batch.labeled_image.device)  # type: ignore[arg-type]
        image, label = self.pretraining_mix(batch, cube)
        dice, ce = region_dice_ce(self.student(image), label)
        loss = self.weighted_loss(dice, ce)
        return self._terms(loss, (loss, ce, dice), torch.zeros((), device=loss.device), 0.0, None)

    def self_training_step(self, batch: Batch) -> dict[str, Tensor]:
        """Stage 2: both mixed volumes, ground truth weighted 1 and pseudo-labels ``unlabeled_weight``."""
        if batch.unlabeled_image is None or batch.unlabeled_image.shape[0] != batch.labeled_image.shape[0]:
            got = 0 if batch.unlabeled_image is None else batch.unlabeled_image.shape[0]
            raise ValueError(f"bcp needs {self.batch_rule}; got {batch.labeled_image.shape[0]} + {got}")
        unimg_a, unimg_b = _halves(batch.unlabeled_image)
        with torch.no_grad():  # one teacher forward per half, as the code (BatchNorm statistics per half)
            plab_a, removed_a = self.pseudo_labels(unimg_a)
            plab_b, removed_b = self.pseudo_labels(unimg_b)
        cube = copy_paste_cube(tuple(unimg_a.shape[2:]), self.cfg.cube_fraction, device=unimg_a.device)
        mixed = self.mixed_batches(batch, cube, (plab_a, plab_b))
        out_l, out_u = self.student(mixed["mix_l"]), self.student(mixed["mix_u"])
        # (target, logits, ground-truth region) of each mixed volume; the pseudo-labelled region is its complement.
        parts = ((mixed["mix_l_target"], out_l, ~cube), (mixed["mix_u_target"], out_u, cube))
        sup_terms = [region_dice_ce(logits, target, gt) for target, logits, gt in parts]
        unsup_terms = [region_dice_ce(logits, target, ~gt) for target, logits, gt in parts]
        dice = sum(d for d, _ in sup_terms)
        ce = sum(c for _, c in sup_terms)
        sup = self.weighted_loss(dice, ce)  # type: ignore[arg-type]
        unsup = sum(self.weighted_loss(d, c) for d, c in unsup_terms)
        loss = sup + self.cfg.unlabeled_weight * unsup
        removed = (removed_a + removed_b) / 2
        return self._terms(loss, (sup, ce, dice), unsup, self.cfg.unlabeled_weight, removed)  # type: ignore[arg-type]

    @staticmethod
    def _terms(
        loss: Tensor, sup: tuple[Tensor, Tensor, Tensor], unsup: Tensor, weight: float, removed: Tensor | None
    ) -> dict[str, Tensor]:
        """The same named terms in both stages (``removed`` is None in pre-training), so that a log window
        across the boundary averages like any other. ``reliable_fraction`` is 1 in self-training: BCP uses
        every pseudo-label, with no confidence mask."""
        self_training = removed is not None
        reliable = torch.tensor(float(self_training))
        return {
            **consistency_terms(loss, sup, unsup, weight, reliable),
            "self_training": torch.tensor(float(self_training)),
            "lcc_removed_fraction": removed.detach() if removed is not None else torch.zeros(()),
        }

    def after_optimizer_step(self, step: int) -> None:
        """Stage 2 only: the EMA with the code's constant decay (no warm-up)."""
        if self.self_training(step):
            ema_update(self.teacher, self.student, self.cfg.ema_decay)
