"""Every method: its losses are non-zero, reach the student and never the teacher (the USB bug)."""

from __future__ import annotations

import math

import pytest
import torch

from crln.data.batch import Batch
from crln.methods import build_method, method_config_class, method_names
from crln.methods.mean_teacher import cutmix_box_mask, masked_nll
from crln.models import VNet


def _batch(n_labeled: int = 2, n_unlabeled: int = 2, shape: tuple[int, int, int] = (32, 32, 16)) -> Batch:
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(n_labeled, *shape, dtype=torch.int64)
    label[:, 8:24, 8:24, 4:12] = 1
    image = torch.randn(n_labeled, 1, *shape, generator=g) * 0.3 + label.unsqueeze(1).float()
    unlabeled = torch.randn(n_unlabeled, 1, *shape, generator=g) if n_unlabeled else None
    return Batch(labeled_image=image, labeled_label=label, unlabeled_image=unlabeled)


def _build(name: str, **overrides: object):
    config = method_config_class(name)(name=name, **overrides)
    torch.manual_seed(0)
    return build_method(config, lambda: VNet(n_filters=4), num_classes=2)


# Per-method settings that make the unsupervised term active from the first step on tiny inputs.
ACTIVE_UNSUPERVISED = {
    "bcp": {"pretrain_iterations": 0},  # self-training from the first step
    "mean_teacher": {"confidence_threshold": 0.0},
    "crln": {"confidence_threshold": 0.5, "tau_w": 0.0, "rectify_start": 0},
    "ua_mt": {"threshold_start": 1.0, "consistency_rampup_iterations": 0, "passes": 2},
}


@pytest.mark.parametrize("name", method_names())
def test_losses_reach_student_and_never_teacher(name: str) -> None:
    method = _build(name, **ACTIVE_UNSUPERVISED.get(name, {}))
    method.train()
    out = method.train_step(_batch(), step=5)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    teacher = getattr(method, "teacher", None)
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())
        assert out["loss_unsup"] > 0, "unsupervised term must not be identically zero"


def test_unsupervised_term_alone_reaches_student() -> None:
    method = _build("mean_teacher", confidence_threshold=0.0, dice_weight=0.0, ce_weight=0.0)
    out = method.train_step(_batch(), step=0)
    out["loss"].backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_ema_step_moves_teacher_only_after_optimizer_step() -> None:
    method = _build("mean_teacher", ema_decay=0.5)
    before = [p.clone() for p in method.teacher.parameters()]
    assert before
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    # the student moved and a step ran its forward and backward, but the EMA has not run yet
    method.train_step(_batch(), step=100)["loss"].backward()
    assert all(torch.equal(t, b) for t, b in zip(method.teacher.parameters(), before, strict=True))
    method.after_optimizer_step(step=100)
    after = list(method.teacher.parameters())
    assert all(torch.allclose(a, b + 0.5) for a, b in zip(after, before, strict=True))


def test_cutmix_mask_and_pseudo_label_alignment() -> None:
    torch.manual_seed(0)
    mask = cutmix_box_mask((32, 32, 16), 0.5, batch=3)
    assert mask.shape == (3, 1, 32, 32, 16)
    assert torch.all(mask.sum(dim=(1, 2, 3, 4)) == 16 * 16 * 8)
    method = _build("mean_teacher", strong_noise_sigma=0.0)
    weak = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1, 1).expand(2, 1, 32, 32, 16).clone()
    probs = torch.stack([weak[:, 0], 1 - weak[:, 0]], dim=1)  # pseudo-label = which sample a voxel came from
    strong, mixed = method.strong_view(weak, probs)
    assert torch.equal(mixed[:, 0], strong[:, 0])  # every voxel's label comes with its image


def test_masked_nll_respects_threshold() -> None:
    logits = torch.zeros(1, 2, 2, 2, 2)
    probs = torch.full((1, 2, 2, 2, 2), 0.5)
    probs[..., 0, 0, 0] = torch.tensor([0.99, 0.01])
    loss, reliable = masked_nll(logits, probs, threshold=0.9)
    assert reliable == pytest.approx(1 / 8)
    assert loss == pytest.approx(torch.log(torch.tensor(2.0)).item() / 8)


def test_ua_mt_uncertainty_mask_and_threshold_ramp() -> None:
    method = _build("ua_mt", passes=3, threshold_rampup_iterations=100)
    early = method.train_step(_batch(), step=0)
    late = method.train_step(_batch(), step=100)
    start = 0.75 + 0.25 * math.exp(-5)  # sigmoid ramp at t = 0
    assert early["uncertainty_threshold"] == pytest.approx(start * math.log(2))
    assert late["uncertainty_threshold"] == pytest.approx(math.log(2))
    assert early["uncertainty_threshold"] < late["uncertainty_threshold"]
    assert 0.0 <= float(late["certain_fraction"]) <= 1.0
    # Entropy of the mean softmax is bounded by ln C.
    _, entropy = method.teacher_prediction(_batch().unlabeled_image)
    assert entropy.shape == (2, 1, 32, 32, 16)
    assert float(entropy.max()) <= math.log(2) + 1e-4
