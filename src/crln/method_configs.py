"""The hyper-parameter dataclasses of every training method, by ``method.name`` (torch-free).

They live apart from the methods (:mod:`crln.methods`, which need torch) so that a config is
parsed and checked completely before torch is imported: a typo in a config fails in a fraction of
a second instead of after torch's several seconds of loading. Each method module re-exports its
config class (``crln.methods.crln.CRLNConfig`` is this module's class).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar

from crln.errors import CrlnError

__all__ = [
    "METHOD_CONFIGS",
    "MU_SIGMOID_RANGE",
    "RECTIFY_VARIANTS",
    "STRONG_VIEWS",
    "UNSUP_LOSSES",
    "UPSAMPLE_MODES",
    "BCPConfig",
    "CRLNConfig",
    "MeanTeacherConfig",
    "MethodConfig",
    "SupervisedConfig",
    "UAMTConfig",
    "method_config_class",
]

RECTIFY_VARIANTS = ("fixed_v1", "learnable_v2", "learnable_v3")  # CRLN's pseudo-label rectifiers (dim.Rectifier)
UPSAMPLE_MODES = ("deconv", "deconv_relu", "trilinear")  # eq. 6's Upsample (dim.DynamicInteractionModule)
# μ = sigmoid(raw) must start where its gradient μ(1 − μ) is usable: at μ = 0.01 it is ~0.01, at the
# former silent clamp 1e-4 it was 1e-4 and μ stayed frozen (issue 16).
MU_SIGMOID_RANGE = (0.01, 0.99)
UNSUP_LOSSES = ("weighted", "weighted_nonzero", "masked")  # CRLN's ℓu normalisations
STRONG_VIEWS = ("field", "authors")  # the weak→strong methods' strong view (crln.methods.strong_view)


@dataclass
class MethodConfig:
    """Fields every method config has; each method subclasses it with its own hyper-parameters."""

    name: str = "supervised"
    dice_weight: float = 0.5  # supervised loss = dice_weight * Dice + ce_weight * CE
    ce_weight: float = 0.5
    #: What ``eval.network`` may name for this method (``Method.inference_network``).
    inference_networks: ClassVar[tuple[str, ...]] = ("student",)


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
    # Student forward: one pass over [labelled, strong unlabelled] (shared BatchNorm batch statistics) or,
    # with separate_forward, one pass per stream (the CRLN authors' code: separate statistics).
    separate_forward: bool = False
    # Strong view: "field" (noise + the 3-D CutMix box above) or "authors" (the CRLN code's zoom, 2-D full-depth
    # CutMix, brightness, noise, rot/flip, min-max; crln.methods.strong_view; needs data.intensity=minmax).
    strong_view: str = "field"
    inference_networks: ClassVar[tuple[str, ...]] = ("student", "teacher")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {self.confidence_threshold}")
        if not 0.0 < self.cutmix_box_fraction < 1.0:
            raise ValueError(f"cutmix_box_fraction must be in (0, 1), got {self.cutmix_box_fraction}")
        if self.strong_view not in STRONG_VIEWS:
            raise ValueError(f"strong_view must be one of {', '.join(STRONG_VIEWS)}, got {self.strong_view!r}")
        # a negative clip clamps every noise value to it: a constant shift instead of noise
        if min(self.unsup_weight, self.strong_noise_sigma, self.strong_noise_clip, self.rampup_iterations) < 0:
            raise ValueError("unsup_weight, strong_noise_sigma, strong_noise_clip and rampup_iterations must be >= 0")


@dataclass
class UAMTConfig(MethodConfig):
    """Hyper-parameters of UA-MT (defaults: the authors' LA script)."""

    inference_networks: ClassVar[tuple[str, ...]] = ("student", "teacher")

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
        if min(self.consistency_weight, self.input_noise_sigma, self.input_noise_clip) < 0:
            raise ValueError("consistency_weight, input_noise_sigma and input_noise_clip must be >= 0")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


@dataclass
class CRLNConfig(MeanTeacherConfig):
    """Hyper-parameters of CRLN; defaults = the paper's LA setting, the authors' code where they differ."""

    name: str = "crln"
    inference_networks: ClassVar[tuple[str, ...]] = ("student", "teacher", "teacher_rectified")
    # ℓu: "weighted_nonzero" (code): per-sample confident share × NLL, averaged over the voxels with NLL > 0
    # (its masked_select(loss > 0)); "weighted": the same averaged over all voxels; "masked": eq. 2
    unsup_loss: str = "weighted_nonzero"
    # --- prototypes + DIM (Sec. 3.2.1, eq. 3–7; Tab. 6, Fig. 10) ---
    dim: bool = True  # DIM, prototypes and rectification on (off: mean teacher [+ CPS with positive=mean])
    num_prototypes: int = 16  # R prototypes per class
    spatial_awareness: bool = True  # SA: Conv3×3×3 over the R proximity maps (Tab. 6)
    sa_bn_relu: bool = True  # BatchNorm + ReLU between SA and CI (code); off: SA + CI is one linear map
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
    # mean(P^c) in eq. 13: "prototypes" (paper: mean of the R prototypes, projection dim F) | "features" (code: mean
    # over F, projection dim R; inert: the DIM's LayerNorm gives P a zero-mean gradient over F, so it never trains)
    cps_prototype_reduce: str = "prototypes"
    cps_unit_mix: bool = True  # eq. 13 mixes the unit vectors of r_m and mean(P^c) (off: raw vectors, as the code)
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
        _choice("unsup_loss", self.unsup_loss, UNSUP_LOSSES)
        _choice("dim_upsample", self.dim_upsample, UPSAMPLE_MODES)
        _choice("rectify", self.rectify, RECTIFY_VARIANTS)
        _choice("rectify_space", self.rectify_space, ("logits", "probs"))
        _choice("mu_param", self.mu_param, ("clamp", "sigmoid"))
        _choice("mu_step_input", self.mu_step_input, ("post_update", "current"))
        _choice("cps_positive", self.cps_positive, ("mean", "prototype", "mixed"))
        _choice("cps_prototype_reduce", self.cps_prototype_reduce, ("features", "prototypes"))
        _choice("cps_prototype_source", self.cps_prototype_source, ("teacher", "student"))
        low, high = MU_SIGMOID_RANGE
        checks = [
            ("num_prototypes", self.num_prototypes >= 1, "an integer >= 1"),
            ("rectify_start", self.rectify_start >= 0, "an integer >= 0"),
            ("mu_init", 0.0 <= self.mu_init <= 1.0, "a number in [0, 1]"),
            (
                "mu_init",
                self.mu_param != "sigmoid" or low <= self.mu_init <= high,
                f"in [{low}, {high}] with mu_param=sigmoid (its gradient vanishes at 0 and 1)",
            ),
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


@dataclass
class BCPConfig(MethodConfig):
    """Hyper-parameters of BCP; defaults are the authors' LA script (``code/LA_BCP_train.py``)."""

    name: str = "bcp"
    inference_networks: ClassVar[tuple[str, ...]] = ("student", "teacher")
    pretrain_iterations: int = 2000  # stage 1 length (--pre_max_iteration); stage 2 is the rest of train.iterations
    ema_decay: float = 0.99  # constant EMA decay of the teacher in stage 2 (update_ema_variables(…, 0.99))
    cube_fraction: float = 2 / 3  # copy-paste cube side / patch side (--mask_ratio)
    unlabeled_weight: float = 0.5  # loss weight of pseudo-labelled voxels; ground truth has 1 (--u_weight)
    largest_component: bool = True  # keep each pseudo-label's largest connected component (get_cut_mask nms=1)
    # At self-training: a fresh optimiser state and the LR schedule from its start (LA code: a new SGD);
    # false carries both over (the Pancreas code reloads the pre-training optimiser state).
    restart_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.pretrain_iterations < 0:
            raise ValueError(f"pretrain_iterations must be >= 0, got {self.pretrain_iterations}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 < self.cube_fraction < 1.0:
            raise ValueError(f"cube_fraction must be in (0, 1), got {self.cube_fraction}")
        if self.unlabeled_weight < 0:
            raise ValueError(f"unlabeled_weight must be >= 0, got {self.unlabeled_weight}")


#: ``method.name`` → its config class; every method of :mod:`crln.methods` is registered under one of these names.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (SupervisedConfig, MeanTeacherConfig, UAMTConfig, CRLNConfig, BCPConfig)
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
