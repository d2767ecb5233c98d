"""The hyper-parameter dataclasses of every training method, by ``method.name`` (torch-free).

They live apart from the methods (:mod:`crln.methods`, which need torch) so that a config is
parsed and checked completely before torch is imported: a typo in a config fails in a fraction of
a second instead of after torch's several seconds of loading. Each method module re-exports its
config class (``crln.methods.crln.CRLNConfig`` is this module's class).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from crln.errors import CrlnError

__all__ = [
    "METHOD_CONFIGS",
    "RECTIFY_VARIANTS",
    "UPSAMPLE_MODES",
    "CRLNConfig",
    "MeanTeacherConfig",
    "MethodConfig",
    "SupervisedConfig",
    "UAMTConfig",
    "method_config_class",
]

RECTIFY_VARIANTS = ("fixed_v1", "learnable_v2", "learnable_v3")  # CRLN's pseudo-label rectifiers (dim.Rectifier)
UPSAMPLE_MODES = ("deconv", "deconv_relu", "trilinear")  # eq. 6's Upsample (dim.DynamicInteractionModule)


@dataclass
class MethodConfig:
    """Fields every method config has; each method subclasses it with its own hyper-parameters."""

    name: str = "supervised"
    dice_weight: float = 0.5  # supervised loss = dice_weight * Dice + ce_weight * CE
    ce_weight: float = 0.5


@dataclass
class SupervisedConfig(MethodConfig):
    """Supervised training has no hyper-parameters beyond the loss weights."""

    name: str = "supervised"


@dataclass
class MeanTeacherConfig(MethodConfig):
    """Hyper-parameters of the mean teacher (defaults: the CRLN paper's baseline row 2)."""

    name: str = "mean_teacher"
    ema_decay: float = 0.99
    confidence_threshold: float = 0.97  # τ in eq. 2
    unsup_weight: float = 0.5  # weight of eq. 2 in the total loss
    rampup_iterations: int = 0  # sigmoid ramp-up of unsup_weight (0 = constant weight)
    cutmix: bool = True  # 3D CutMix between unlabelled samples in the strong view
    cutmix_box_fraction: float = 2 / 3  # CutMix box side as a fraction of each patch side
    strong_noise_sigma: float = 0.1  # Gaussian noise of the strong view (0 = none)
    strong_noise_clip: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {self.confidence_threshold}")
        if not 0.0 < self.cutmix_box_fraction < 1.0:
            raise ValueError(f"cutmix_box_fraction must be in (0, 1), got {self.cutmix_box_fraction}")
        if self.unsup_weight < 0 or self.strong_noise_sigma < 0 or self.rampup_iterations < 0:
            raise ValueError("unsup_weight, strong_noise_sigma and rampup_iterations must be >= 0")


@dataclass
class UAMTConfig(MethodConfig):
    """Hyper-parameters of UA-MT (defaults: the authors' LA script)."""

    name: str = "ua_mt"
    ema_decay: float = 0.99
    passes: int = 8  # T stochastic teacher passes per unlabelled patch
    input_noise_sigma: float = 0.1  # teacher input noise N(0, sigma) ...
    input_noise_clip: float = 0.2  # ... clipped to ±clip
    consistency_weight: float = 0.1
    consistency_rampup_iterations: int = 6000  # sigmoid ramp of the consistency weight
    threshold_start: float = 0.75  # uncertainty threshold, times ln C, at iteration 0 ...
    threshold_end: float = 1.0  # ... and after threshold_rampup_iterations
    threshold_rampup_iterations: int = 6000  # the authors ramp over the whole run

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.consistency_weight < 0 or self.input_noise_sigma < 0:
            raise ValueError("consistency_weight and input_noise_sigma must be >= 0")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


@dataclass
class CRLNConfig(MeanTeacherConfig):
    """Hyper-parameters of CRLN; defaults = the paper's LA setting, the authors' code where they differ."""

    name: str = "crln"
    unsup_loss: str = "weighted"  # "weighted": code (per-sample confident share × NLL); "masked": eq. 2
    # --- prototypes + DIM (Sec. 3.2.1, eq. 3–7; Tab. 6, Fig. 10) ---
    dim: bool = True  # DIM, prototypes and rectification on (off: mean teacher [+ CPS with positive=mean])
    num_prototypes: int = 16  # R prototypes per class
    spatial_awareness: bool = True  # SA: Conv3×3×3 over the R proximity maps (Tab. 6)
    conv_integration: bool = True  # CI: Conv1×1×1 over R (off: sum over R) (Tab. 6)
    cross_class: bool = True  # CR: SA/CI weights shared across classes (off: one set per class) (Tab. 6)
    normalize_proximity: bool = True  # standardise each proximity map over its positions (code: LayerNorm over N)
    dim_upsample: str = "deconv"  # "deconv": 2×2×2 transposed conv (eq. 6); "deconv_relu": + ReLU (code); "trilinear"
    prototype_init_std: float = 0.02  # normal init of P (0 = zeros, as the code)
    dim_weight: float = 1.0  # weight of ℓs(M(x), y) in eq. 15 (code: 0.5·CE + 0.5·Dice, like ℓs(ŷ, y))
    # --- rectification (Sec. 3.2.2, eq. 8, 16, 17; Tab. 7) ---
    rectify: str = "learnable_v3"  # "fixed_v1" (eq. 17) | "learnable_v2" (concat + Conv3×3×3) | "learnable_v3" (eq. 8)
    rectify_space: str = "logits"  # "logits": ȳ + (1−μ)M on logits, softmax (code); "probs": mix probabilities
    rectify_start: int = 800  # S: first (0-based) iteration whose pseudo-labels are rectified
    mu_param: str = "clamp"  # "clamp": μ raw scalar clamped to [0, 1]; "sigmoid": μ = sigmoid(raw)
    mu_init: float = 0.0  # initial μ (code: 0)
    mu_lr: float = 2.5e-3  # learning rate of the rectifier's own SGD (code: the main lr)
    mu_momentum: float = 0.9  # its momentum (code: 0.9)
    mu_nesterov: bool = True  # Nesterov momentum (code: yes)
    mu_weight_decay: float = 5e-4  # its weight decay (code: 5e-4)
    mu_lr_iterations: int = 0  # poly decay of mu_lr over this many iterations (0 = constant)
    mu_step_input: str = "post_update"  # eq. 16 on: "post_update" (code: re-run updated student, eval mode) | "current"
    # --- Collaborative Positive Supervision (Sec. 3.3, eq. 9–14; Tab. 5) ---
    cps: bool = True  # the contrastive term ℓcp on/off
    cps_weight: float = 0.5  # weight of ℓcp in eq. 15 (code: 0.5)
    cps_positive: str = "mixed"  # "mean" (MR) | "prototype" (LP) | "mixed" (eq. 13)
    cps_prototype_reduce: str = (
        "features"  # mean(P^c): "features" (code, projection dim R) | "prototypes" (paper, dim F)
    )
    cps_prototype_source: str = (
        "teacher"  # prototypes in the positive: "teacher" (code, no gradient) | "student" (grad to P)
    )
    cps_prototypes_from_start: bool = False  # use prototypes in the positive before S (code: only from S on)
    xi: float = 0.6  # ξ in eq. 13
    xi_random: bool = False  # draw ξ ~ U(0, 1) each iteration instead of the fixed xi
    tau_w: float = 0.7  # τ_w: pseudo-label confidence for CPS anchors/negatives/means (eq. 10, 12), < τ
    temperature: float = 0.5  # t in eq. 14
    num_anchors: int = 256  # anchors per class
    num_negatives: int = 512  # negatives per class (per anchor when sampling with replacement)
    cps_with_replacement: bool = True  # code: with replacement, per-anchor negatives; off: distinct, shared

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("unsup_loss", self.unsup_loss, ("weighted", "masked"))
        _choice("dim_upsample", self.dim_upsample, UPSAMPLE_MODES)
        _choice("rectify", self.rectify, RECTIFY_VARIANTS)
        _choice("rectify_space", self.rectify_space, ("logits", "probs"))
        _choice("mu_param", self.mu_param, ("clamp", "sigmoid"))
        _choice("mu_step_input", self.mu_step_input, ("post_update", "current"))
        _choice("cps_positive", self.cps_positive, ("mean", "prototype", "mixed"))
        _choice("cps_prototype_reduce", self.cps_prototype_reduce, ("features", "prototypes"))
        _choice("cps_prototype_source", self.cps_prototype_source, ("teacher", "student"))
        checks = [
            ("num_prototypes", self.num_prototypes >= 1, "an integer >= 1"),
            ("rectify_start", self.rectify_start >= 0, "an integer >= 0"),
            ("mu_init", 0.0 <= self.mu_init <= 1.0, "a number in [0, 1]"),
            ("mu_lr", self.mu_lr >= 0, "a number >= 0"),
            ("mu_momentum", 0.0 <= self.mu_momentum < 1.0, "a number in [0, 1)"),
            ("mu_weight_decay", self.mu_weight_decay >= 0, "a number >= 0"),
            ("mu_lr_iterations", self.mu_lr_iterations >= 0, "an integer >= 0"),
            ("dim_weight", self.dim_weight >= 0, "a number >= 0"),
            ("cps_weight", self.cps_weight >= 0, "a number >= 0"),
            ("xi", self.xi >= 0, "a number >= 0"),
            ("tau_w", 0.0 <= self.tau_w < 1.0, "a number in [0, 1)"),
            ("tau_w", self.tau_w < self.confidence_threshold, f"< confidence_threshold ({self.confidence_threshold})"),
            ("temperature", self.temperature > 0, "a number > 0"),
            ("num_anchors", self.num_anchors >= 1, "an integer >= 1"),
            ("num_negatives", self.num_negatives >= 1, "an integer >= 1"),
            ("prototype_init_std", self.prototype_init_std >= 0, "a number >= 0"),
            ("cps_positive", self.dim or self.cps_positive == "mean", "'mean' when dim is off (no prototypes)"),
        ]
        for field_name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{field_name} must be {expected}, got {getattr(self, field_name)!r}")


#: ``method.name`` → its config class; every method of :mod:`crln.methods` is registered under one of these names.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (SupervisedConfig, MeanTeacherConfig, UAMTConfig, CRLNConfig)
}


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the method named ``name``.

    Raises:
        CrlnError: no method of that name (the message lists them and the nearest spelling).
    """
    if name not in METHOD_CONFIGS:
        close = difflib.get_close_matches(name, list(METHOD_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CrlnError(
            f"config key method.name: unknown method {name!r} (available: {', '.join(sorted(METHOD_CONFIGS))}){hint}"
        )
    return METHOD_CONFIGS[name]
