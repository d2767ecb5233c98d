"""CRLN: mean teacher + DIM prototypes + learned pseudo-label rectification + CPS.

Paper: Wang et al., "Cooperative Rectification Learning Network", Medical Image Analysis 2025,
Sec. 3 (eq. 1–16), Algorithm 1; authors' code ``Yaan-Wang/CRLN/VnetLA`` for the facts the paper
leaves open. One iteration (``train_step`` + ``after_optimizer_step``):

1. Teacher (EMA) on the weak unlabelled view → ȳ; from iteration ``rectify_start`` (S) on, the
   teacher's DIM and prototypes give ``M(x_u)`` and ȳ_r = rectify(ȳ, M) (eq. 8), else ȳ_r = ȳ.
2. Strong view: noise + the same CutMix box on the image and on ȳ_r (MeanTeacher.strong_view).
3. Student on [labelled, strong unlabelled] with decoder features; eq. 15 =
   ℓs(ŷ_l, y) + dim_weight·ℓs(M(x_l), y) + unsup_weight·ℓu(ŷ_u, ȳ_r) + cps_weight·ℓcp.
4. After the engine's optimiser step: EMA of backbone, DIM and prototypes into the teacher, then
   the rectifier's own step on eq. 16 (μ for ``learnable_v3``), alternating with eq. 15.

μ (and the ``learnable_v2`` convolution) never enter ``out["loss"]``: their gradient is taken with
``torch.autograd.grad`` on eq. 16 alone and left in ``.grad`` by ``after_optimizer_step``; the engine
then steps the method's extra optimiser ``"mu"`` (:meth:`CRLN.configure_optimizers`, a
:class:`BufferSGD` whose momentum buffers are module buffers, so ``state_dict`` holds them and
checkpoints of every crln version resume).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crln.collectives import all_reduce_mean_
from crln.data.batch import Batch
from crln.errors import CrlnError
from crln.method_configs import CRLNConfig, MethodConfig
from crln.methods.base import (
    ExtraOptimizer,
    ModelFactory,
    Optimizers,
    RectificationViews,
    TimelineMark,
    frozen_copy,
    register_method,
)
from crln.methods.cps import CPSHead, cps_loss, positive_prototypes, sample_cps
from crln.methods.dim import DynamicInteractionModule, Rectifier
from crln.methods.losses import DiceCELoss
from crln.methods.mean_teacher import MeanTeacher, consistency_terms, masked_nll
from crln.methods.ramps import sigmoid_rampup

if TYPE_CHECKING:
    from crln.config import OptimConfig

__all__ = [
    "CRLN",
    "BufferSGD",
    "CRLNConfig",
    "RectifiedNetwork",
    "pseudo_label_dice",
    "saturated_fraction",
    "weighted_nll",
]


UNSUP_LOSSES = ("weighted", "weighted_nonzero", "masked")


def weighted_nll(
    student_logits: Tensor, pseudo_probs: Tensor, threshold: float, nonzero_only: bool = False
) -> tuple[Tensor, Tensor]:
    """The authors' unsupervised term: NLL of the pseudo-label argmax on every voxel, weighted per
    sample by the share of its voxels with confidence ≥ ``threshold``. Returns ``(loss, reliable)``.

    ``nonzero_only=False`` averages over all voxels; ``True`` averages only over the voxels whose NLL
    is > 0, as the code's ``masked_select(loss > 0)`` does. The two differ once logit margins exceed
    ~17 and the NLL rounds to exactly 0 in fp32 (see :func:`saturated_fraction`).
    """
    confidence, target = pseudo_probs.max(dim=1)
    mask = (confidence >= threshold).float()
    weight = mask.flatten(1).mean(dim=1)  # (B,)
    nll = F.cross_entropy(student_logits.float(), target, reduction="none")  # (B, H, W, D)
    weighted = nll * weight.view(-1, *([1] * (nll.dim() - 1)))
    if not nonzero_only:
        return weighted.mean(), mask.mean()
    positive = nll > 0
    return (weighted * positive).sum() / positive.sum().clamp_min(1), mask.mean()


@torch.no_grad()
def saturated_fraction(student_logits: Tensor, pseudo_probs: Tensor) -> Tensor:
    """Share of voxels whose NLL against the pseudo-label argmax is exactly 0 in fp32 (saturated margin)."""
    target = pseudo_probs.argmax(dim=1)
    return (F.cross_entropy(student_logits.float(), target, reduction="none") == 0).float().mean()


@torch.no_grad()
def pseudo_label_dice(probs: Tensor, oracle: Tensor, threshold: float | None = None) -> Tensor:
    """Mean foreground Dice of ``argmax probs`` against ``oracle`` (monitoring only).

    With ``threshold`` only voxels whose confidence is ≥ it count (both sides). Empty vs empty = 1.
    """
    confidence, pred = probs.max(dim=1)
    keep = torch.ones_like(pred, dtype=torch.bool) if threshold is None else confidence >= threshold
    scores = []
    for c in range(1, probs.shape[1]):
        p, g = (pred == c) & keep, (oracle == c) & keep
        denom = p.sum() + g.sum()
        scores.append(
            torch.where(denom > 0, 2.0 * (p & g).sum() / denom.clamp_min(1), torch.ones((), device=denom.device))
        )
    return torch.stack(scores).float().mean()


@register_method
class CRLN(MeanTeacher):
    """Cooperative Rectification Learning Network over the mean teacher (see the module docstring)."""

    name = "crln"
    config_class = CRLNConfig
    monitors_pseudo_labels = True

    def __init__(self, config: CRLNConfig, model_factory: ModelFactory, num_classes: int) -> None:
        super().__init__(config, model_factory, num_classes)
        quarter, half, full = _decoder_widths(self.student)
        self.student_dim: DynamicInteractionModule | None = None
        self.teacher_dim: DynamicInteractionModule | None = None
        self.rectifier: Rectifier | None = None
        if config.dim:
            self.student_dim = DynamicInteractionModule(
                num_classes,
                config.num_prototypes,
                quarter,
                half,
                spatial_awareness=config.spatial_awareness,
                sa_bn_relu=config.sa_bn_relu,
                conv_integration=config.conv_integration,
                cross_class=config.cross_class,
                normalize_proximity=config.normalize_proximity,
                upsample=config.dim_upsample,
                prototype_init_std=config.prototype_init_std,
            )
            self.teacher_dim = frozen_copy(self.student_dim)
            self.rectifier = Rectifier(
                config.rectify,
                num_classes,
                space=config.rectify_space,
                mu_param=config.mu_param,
                mu_init=config.mu_init,
                threshold=config.confidence_threshold,
            )
            for i, p in enumerate(self.rectifier.parameters()):
                self.register_buffer(f"rect_momentum_{i}", torch.zeros_like(p))
        self.register_buffer("rect_loss_last", torch.zeros(()))
        self.cps_head: CPSHead | None = None
        if config.cps:
            dim = config.num_prototypes if config.cps_prototype_reduce == "features" else quarter
            self.cps_head = CPSHead(full, dim)
        self.dim_loss = DiceCELoss(config.dice_weight, config.ce_weight)
        self.rect_loss = DiceCELoss(config.dice_weight, config.ce_weight)
        self._pending: dict[str, object] = {}

    # --- engine interface -------------------------------------------------------------------
    def inference_network(self, which: str = "student") -> nn.Module:
        """``"teacher_rectified"``: the authors' test-time network (their ``validate.py``), the EMA teacher
        with its DIM and the learned rectification, ``ȳ + (1 − μ)·M(x)``; else as the mean teacher."""
        if which != "teacher_rectified":
            return super().inference_network(which)
        if self.teacher_dim is None or self.rectifier is None:
            raise CrlnError("config key eval.network: 'teacher_rectified' needs method.dim=true (the DIM gives M(x))")
        return RectifiedNetwork(self.teacher, self.teacher_dim, self.rectifier)

    def trainable_parameters(self):
        """Student backbone, student DIM + prototypes, CPS projection (not the teacher, not μ)."""
        params = list(self.student.parameters())
        if self.student_dim is not None:
            params += list(self.student_dim.parameters())
        if self.cps_head is not None:
            params += list(self.cps_head.parameters())
        return iter(params)

    # --- what the report and the bench show -------------------------------------------------
    @classmethod
    def report_facts(cls, config: MethodConfig) -> list[tuple[str, str]]:
        cfg: CRLNConfig = config  # type: ignore[assignment]
        if not cfg.dim:
            return [("rectification", "off (method.dim=false: no DIM, no M(x))")]
        return [("rectification start S", str(cfg.rectify_start))]

    @classmethod
    def timeline_marks(cls, config: MethodConfig) -> tuple[TimelineMark, ...]:
        cfg: CRLNConfig = config  # type: ignore[assignment]
        if not cfg.dim:
            return ()
        return (TimelineMark(cfg.rectify_start, "S", f"rectification starts (S = {cfg.rectify_start})"),)

    @torch.no_grad()
    def rectification_views(self, patch: Tensor) -> RectificationViews | None:
        """The teacher's ȳ, its DIM's M(x) and the rectified ȳ_r (eq. 8) on one patch; ``None`` without the DIM."""
        if self.teacher_dim is None or self.rectifier is None:
            return None
        cfg: CRLNConfig = self.config  # type: ignore[assignment]
        logits, feats = self.teacher(patch, return_features=True)
        m = self.teacher_dim(feats["quarter"], feats["half"])
        rectified = self.rectifier(logits, m)
        mu = self.rectifier.mu()

        def probs(scores: Tensor) -> np.ndarray:
            return torch.softmax(scores.float(), 1)[0].cpu().numpy()

        return RectificationViews(
            probs(logits),
            probs(m),
            probs(rectified),
            threshold=cfg.confidence_threshold,
            start=cfg.rectify_start,
            weight=None if mu is None else float(mu.detach()),
        )

    def configure_optimizers(self, optim: OptimConfig) -> Optimizers:
        """The engine's SGD for eq. 15 and, with a learnable rectifier, ``"mu"``: SGD on eq. 16 alone.

        μ's learning rate is ``mu_lr``, poly-decayed over ``mu_lr_iterations`` (constant when 0); after
        each of its steps the rectifier projects μ back into its range (``mu_param="clamp"``).
        """
        optimizers = super().configure_optimizers(optim)
        if self.rectifier is None or not list(self.rectifier.parameters()):
            return optimizers
        cfg: CRLNConfig = self.config  # type: ignore[assignment]
        params = list(self.rectifier.parameters())
        buffers = [getattr(self, f"rect_momentum_{i}") for i in range(len(params))]
        mu = BufferSGD(params, buffers, cfg.mu_lr, cfg.mu_momentum, cfg.mu_weight_decay, cfg.mu_nesterov)
        rectifier = self.rectifier
        mu.register_step_post_hook(lambda *_: rectifier.project_())
        optimizers.extra["mu"] = ExtraOptimizer(mu, lr=cfg.mu_lr, poly_iterations=cfg.mu_lr_iterations)
        return optimizers

    # --- pieces -----------------------------------------------------------------------------
    def rectification_active(self, step: int) -> bool:
        cfg: CRLNConfig = self.config  # type: ignore[assignment]
        return cfg.dim and step >= cfg.rectify_start

    @torch.no_grad()
    def teacher_pseudo_labels(self, weak: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Teacher probabilities of the weak view before and after rectification (eq. 8, Alg. 1 l. 7–12)."""
        logits, feats = self.teacher(weak, return_features=True)
        raw = torch.softmax(logits.float(), dim=1)
        if not self.rectification_active(step):
            return raw, raw
        assert self.teacher_dim is not None and self.rectifier is not None
        m = self.teacher_dim(feats["quarter"], feats["half"])
        return raw, torch.softmax(self.rectifier(logits, m).float(), dim=1)

    def _rectifier_grads(self, pred: Tensor, m: Tensor, label: Tensor) -> None:
        """Eq. 16 on detached inputs: store the rectifier's gradient and loss for its own step."""
        assert self.rectifier is not None
        params = list(self.rectifier.parameters())
        if not params:
            return
        with torch.enable_grad():
            loss, _, _ = self.rect_loss(self.rectifier(pred.detach(), m.detach()), label)
            grads = torch.autograd.grad(loss, params)
        loss = loss.detach()
        # Data parallel: each process holds a share of the labelled batch; averaging the gradient (and the
        # logged loss) gives every process the same rectifier step, as the engine's DDP does for eq. 15.
        all_reduce_mean_([*grads, loss])
        self._pending["grads"] = grads
        self.rect_loss_last.copy_(loss)

    def _cps_term(self, logits: Tensor, full: Tensor, label: Tensor, pseudo: Tensor, step: int) -> tuple[Tensor, float]:
        cfg: CRLNConfig = self.config  # type: ignore[assignment]
        assert self.cps_head is not None
        C = self.num_classes
        rep = self.cps_head(full)
        with torch.no_grad():
            conf, arg = pseudo.max(dim=1)
            valid_u = F.one_hot(arg, C).movedim(-1, 1).bool() & (conf >= cfg.tau_w).unsqueeze(1)
            valid_l = F.one_hot(label, C).movedim(-1, 1).bool()
            valid = torch.cat([valid_l, valid_u], dim=0)
            probs = torch.softmax(logits.detach().float(), dim=1)
            samples = sample_cps(
                valid, probs, cfg.confidence_threshold, cfg.num_anchors, cfg.num_negatives, cfg.cps_with_replacement
            )
        xi = float(torch.rand(())) if cfg.xi_random else cfg.xi
        proto_term = None
        use_protos = cfg.dim and (cfg.cps_prototypes_from_start or self.rectification_active(step))
        if cfg.cps_positive != "mean" and use_protos:
            dim = self.teacher_dim if cfg.cps_prototype_source == "teacher" else self.student_dim
            assert dim is not None
            protos = dim.prototypes.detach() if cfg.cps_prototype_source == "teacher" else dim.prototypes
            proto_term = positive_prototypes(protos, cfg.cps_prototype_reduce)
        xi_used = float("inf") if cfg.cps_positive == "prototype" else xi
        return cps_loss(rep, valid, samples, proto_term, xi_used, cfg.temperature, cfg.cps_unit_mix), xi

    # --- one iteration ----------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg: CRLNConfig = self.config  # type: ignore[assignment]
        if batch.unlabeled_image is None:
            raise ValueError("crln needs unlabelled images in the batch")
        weak = batch.unlabeled_image
        raw, rectified = self.teacher_pseudo_labels(weak, step)
        strong, pseudo = self.strong_view(weak, rectified)  # same CutMix box for image and ȳ_r (A_g)

        n_labeled = batch.labeled_image.shape[0]
        logits, feats = self.student_forward(batch.labeled_image, strong, return_features=True)
        sup, ce, dice = self.supervised_loss(logits[:n_labeled], batch.labeled_label)
        if cfg.unsup_loss == "masked":
            unsup, reliable = masked_nll(logits[n_labeled:], pseudo, cfg.confidence_threshold)
        else:
            nonzero = cfg.unsup_loss == "weighted_nonzero"
            unsup, reliable = weighted_nll(logits[n_labeled:], pseudo, cfg.confidence_threshold, nonzero)
        weight = cfg.unsup_weight * sigmoid_rampup(step, cfg.rampup_iterations)
        loss = sup + weight * unsup
        out: dict[str, Tensor] = {}

        if self.student_dim is not None:
            m_l = self.student_dim(feats["quarter"][:n_labeled], feats["half"][:n_labeled])
            loss_dim, _, _ = self.dim_loss(m_l, batch.labeled_label)
            loss = loss + cfg.dim_weight * loss_dim
            out["loss_dim"] = loss_dim.detach()
            if cfg.mu_step_input == "current":
                self._rectifier_grads(logits[:n_labeled], m_l, batch.labeled_label)
            else:
                self._pending["labeled"] = (batch.labeled_image.detach(), batch.labeled_label)
                self._pending["autocast"] = _autocast_state(batch.labeled_image.device.type)
            out["loss_rect"] = self.rect_loss_last.clone()  # eq. 16 of the latest rectifier step
            assert self.rectifier is not None
            mu = self.rectifier.mu()
            if mu is not None:
                out["mu"] = mu.detach().clone()

        if self.cps_head is not None:
            loss_cps, xi = self._cps_term(logits, feats["full"], batch.labeled_label, pseudo, step)
            loss = loss + cfg.cps_weight * loss_cps
            out["loss_cps"] = loss_cps.detach()
            out["xi"] = torch.tensor(xi)

        with torch.no_grad():
            out.update(
                reliable_before=(raw.max(dim=1).values >= cfg.confidence_threshold).float().mean(),
                reliable_after=(rectified.max(dim=1).values >= cfg.confidence_threshold).float().mean(),
                saturated_fraction=saturated_fraction(logits[n_labeled:], pseudo),
                rectified=torch.tensor(float(self.rectification_active(step))),
            )
            oracle = batch.unlabeled_oracle_label
            if oracle is not None:
                tau = cfg.confidence_threshold
                out.update(
                    dice_all_before=pseudo_label_dice(raw, oracle),
                    dice_all_after=pseudo_label_dice(rectified, oracle),
                    dice_reliable_before=pseudo_label_dice(raw, oracle, tau),
                    dice_reliable_after=pseudo_label_dice(rectified, oracle, tau),
                )
        return {**consistency_terms(loss, (sup, ce, dice), unsup, weight, reliable), **out}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().ema_pairs()
        if self.student_dim is not None and self.teacher_dim is not None:
            pairs.append((self.teacher_dim, self.student_dim))  # DIM and prototypes P_t ← EMA of P_s
        return pairs

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)  # EMA of backbone, DIM and prototypes
        labeled = self._pending.pop("labeled", None)
        autocast = self._pending.pop("autocast", None)
        if labeled is not None and self.student_dim is not None:
            # The authors' order: eq. 16 on the just-updated student, in eval mode, without gradient to it.
            image, label = labeled  # type: ignore[misc]
            modes = (self.student.training, self.student_dim.training)
            self.student.eval()
            self.student_dim.eval()
            try:
                with torch.no_grad(), _autocast_context(image.device.type, autocast):
                    pred, feats = self.student(image, return_features=True)
                    m = self.student_dim(feats["quarter"], feats["half"])
                self._rectifier_grads(pred, m, label)
            finally:
                self.student.train(modes[0])
                self.student_dim.train(modes[1])
        grads = self._pending.pop("grads", None)
        if grads is not None and self.rectifier is not None:
            # μ's gradient appears only now, for the engine's step of the "mu" optimiser (configure_optimizers).
            for p, g in zip(self.rectifier.parameters(), grads, strict=True):
                p.grad = g


class BufferSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay, Nesterov) whose momentum buffers are given tensors (module buffers).

    Per parameter ``p`` with gradient ``g`` and buffer ``b`` (zero at start):
    ``d = g + weight_decay·p``, ``b ← momentum·b + d``, ``p ← p − lr·(d + momentum·b if nesterov else b)``,
    what ``torch.optim.SGD`` computes (its first step sets ``b = d``, as a zero buffer gives). The
    buffers belong to the method, so its ``state_dict`` keeps them; this optimiser's own state is empty.
    Parameters without a gradient are skipped.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        buffers: list[Tensor],
        lr: float,
        momentum: float,
        weight_decay: float,
        nesterov: bool,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})
        self._buffers = buffers  # in the order of ``params``

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        del closure
        index = 0
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                buf = self._buffers[index]
                index += 1
                if p.grad is None:
                    continue
                d = p.grad + group["weight_decay"] * p
                buf.mul_(momentum).add_(d)
                p.sub_(lr * (d + momentum * buf if nesterov else buf))


class RectifiedNetwork(nn.Module):
    """A segmentation network whose output is rectified by its DIM: ``rectifier(logits, M(x))``.

    ``forward(x)`` with ``x`` ``(B, C_in, H, W, D)`` returns scores ``(B, C, H, W, D)`` whose softmax is the
    rectified distribution (logits for the default ``rectify_space``), like any other network's logits.
    """

    def __init__(self, network: nn.Module, dim: DynamicInteractionModule, rectifier: Rectifier) -> None:
        super().__init__()
        self.network, self.dim, self.rectifier = network, dim, rectifier

    def forward(self, x: Tensor) -> Tensor:
        logits, feats = self.network(x, return_features=True)
        return self.rectifier(logits, self.dim(feats["quarter"], feats["half"]))


_FIELD_N_FILTERS = 16  # the field's VNet / 3D-UNet width


def _decoder_widths(network: nn.Module) -> tuple[int, int, int]:
    """Channels of the ``quarter``, ``half`` and ``full`` decoder features of ``network``.

    Networks of :mod:`crln.models` state them in ``feature_channels``; any other network with the
    field's VNet layout is read from its ``n_filters`` (4f, 2f, f; 16 when it has none).
    """
    widths = getattr(network, "feature_channels", None)
    if isinstance(widths, dict):
        return int(widths["quarter"]), int(widths["half"]), int(widths["full"])
    f = int(getattr(network, "n_filters", _FIELD_N_FILTERS))
    return 4 * f, 2 * f, f


def _autocast_state(device_type: str) -> torch.dtype | None:
    """The autocast dtype active in ``train_step`` (reused for the post-update forward), or None."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, RuntimeError, TypeError):
        return None


def _autocast_context(device_type: str, dtype: object):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)  # type: ignore[arg-type]
