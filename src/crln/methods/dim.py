"""CRLN's class prototypes, Dynamic Interaction Module (DIM) and pseudo-label rectifiers.

Paper: Wang et al., "Cooperative Rectification Learning Network", Medical Image Analysis 2025,
Sec. 3.2, eq. 3–8 and 17, Fig. 4, Tab. 6–7. Every module here works for any patch size (sides
multiple of 16) and any number of classes C; see ``docs/method.md`` for the decisions.

Shapes (B batch, C classes, R prototypes per class, F = channels of the decoder's 1/4-resolution
features, F3 = channels of its 1/2-resolution features):

- prototypes ``P``: ``(C, R, F)``, seen as R matrices ``p_i`` of size ``C × F``;
- block I (eq. 3–4): queries ``φ_q(p_i)``, keys/values from ``r2 = Conv1×1(f2)`` at 1/4
  resolution (N2 positions), softmax over the N2 positions → updated prototypes ``p_i^I``;
- block II (eq. 5): ``m_i^II = φ_q(p_i^I) φ_k(r3)ᵀ / √F3`` with ``r3 = Conv1×1(f3)`` at 1/2
  resolution → proximity maps ``M^II``: ``(B, C, R, H/2, W/2, D/2)``;
- aggregation (eq. 6): Conv3×3×3 over the R maps (SA) followed by BatchNorm + ReLU (the authors'
  code), Conv1×1×1 R → 1 (CI), weights shared by all classes (CR), up-sampling to full resolution →
  ``M(x)``: ``(B, C, H, W, D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MU_SIGMOID_RANGE", "RECTIFY_VARIANTS", "UPSAMPLE_MODES", "DynamicInteractionModule", "Rectifier"]

# the config checks them before torch loads
from crln.method_configs import MU_SIGMOID_RANGE, RECTIFY_VARIANTS, UPSAMPLE_MODES


class _CrossAttention(nn.Module):
    """Single-head prototype → voxel cross attention (eq. 3–5).

    Queries are the ``C·R`` prototypes, keys/values the ``N`` voxel tokens. ``forward`` returns the
    scaled logits ``m = φ_q(p) φ_k(r)ᵀ / √d`` ``(B, C·R, N)`` and, when ``with_values``, the
    attention output ``softmax_N(m) φ_v(r)`` ``(B, C·R, d)``: the softmax runs over the spatial axis.
    """

    def __init__(self, query_dim: int, token_dim: int, with_values: bool) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(token_dim)
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(token_dim)
        self.q = nn.Linear(query_dim, token_dim)
        self.k = nn.Linear(token_dim, token_dim)
        self.v = nn.Linear(token_dim, token_dim) if with_values else None
        self.last_attention: Tensor | None = None  # set when ``keep_attention`` (tests, inspection)

    def forward(self, queries: Tensor, tokens: Tensor, keep_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        tokens = self.norm_kv(tokens)
        q = self.q(self.norm_q(queries))  # (B, Q, d)
        k = self.k(tokens)  # (B, N, d)
        logits = torch.bmm(q, k.transpose(1, 2)) * self.scale  # (B, Q, N): Q·N is small (Q = C·R)
        if self.v is None:
            return logits, None
        attention = logits.softmax(dim=-1)  # over the N spatial positions (eq. 4)
        if keep_attention:
            self.last_attention = attention.detach()
        return logits, torch.bmm(attention, self.v(tokens))


class DynamicInteractionModule(nn.Module):
    """Prototypes + DIM: decoder features → holistic relationship map ``M(x)`` (eq. 3–7).

    Args:
        num_classes: C.
        num_prototypes: R prototypes per class.
        quarter_channels: F, channels of the decoder's 1/4-resolution features (the prototype dim).
        half_channels: F3, channels of the decoder's 1/2-resolution features (block II's dim).
        spatial_awareness: SA, the Conv3×3×3 over the R proximity maps (off: identity).
        sa_bn_relu: BatchNorm + ReLU after SA, as the authors' code. Without a non-linearity there,
            SA followed by CI is one linear map R → 1 and Tab. 6's rows SA and SA + CI coincide.
        conv_integration: CI, the Conv1×1×1 from R maps to one (off: sum over R).
        cross_class: CR, SA/CI weights shared by all classes (off: one set of weights per class).
        normalize_proximity: standardise each proximity map over its positions before eq. 6.
        upsample: ``"deconv"`` (learned 2×2×2 transposed conv, eq. 6), ``"deconv_relu"`` (the same
            followed by a ReLU, as the authors' code; on LA at 0.5 scale that ReLU went dead within
            the first iterations, leaving ``M(x) = 0`` and the rectification a no-op, see
            ``docs/method.md``) or ``"trilinear"``.
        prototype_init_std: std of the normal initialisation of P (0 = zeros).

    ``forward(quarter, half)`` with ``quarter`` ``(B, F, h, w, d)`` and ``half`` ``(B, F3, 2h, 2w, 2d)``
    returns ``M(x)`` ``(B, C, 4h, 4w, 4d)`` (logit-like scores, trained with ℓs in eq. 15).
    """

    def __init__(
        self,
        num_classes: int,
        num_prototypes: int,
        quarter_channels: int,
        half_channels: int,
        *,
        spatial_awareness: bool = True,
        sa_bn_relu: bool = True,
        conv_integration: bool = True,
        cross_class: bool = True,
        normalize_proximity: bool = True,
        upsample: str = "deconv",
        prototype_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_prototypes < 1:
            raise ValueError(f"num_classes and num_prototypes must be >= 1, got {num_classes}, {num_prototypes}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {upsample!r}")
        C, R = num_classes, num_prototypes
        self.num_classes, self.num_prototypes = C, R
        self.cross_class = cross_class
        self.normalize_proximity = normalize_proximity
        self.prototypes = nn.Parameter(torch.randn(C, R, quarter_channels) * prototype_init_std)
        self.r2 = nn.Conv3d(quarter_channels, quarter_channels, 1)
        self.r3 = nn.Conv3d(half_channels, half_channels, 1)
        self.block1 = _CrossAttention(quarter_channels, quarter_channels, with_values=True)
        self.block2 = _CrossAttention(quarter_channels, half_channels, with_values=False)
        # Eq. 6. Shared (CR on): convolutions over (B·C, R, ...). Per class (CR off): grouped
        # convolutions over (B, C·R, ...) with one group per class.
        groups = 1 if cross_class else C
        width = R if cross_class else C * R
        self.sa = nn.Conv3d(width, width, 3, padding=1, groups=groups) if spatial_awareness else None
        self.sa_act = nn.Sequential(nn.BatchNorm3d(width), nn.ReLU()) if spatial_awareness and sa_bn_relu else None
        self.ci = nn.Conv3d(width, 1 if cross_class else C, 1, groups=groups) if conv_integration else None
        self.up = nn.ConvTranspose3d(C, C, 2, stride=2) if upsample != "trilinear" else None
        self.output_relu = upsample == "deconv_relu"

    def proximity(self, quarter: Tensor, half: Tensor, keep_attention: bool = False) -> Tensor:
        """Blocks I and II: ``M^II`` ``(B, C, R, *half.shape[2:])``."""
        B = quarter.shape[0]
        C, R = self.num_classes, self.num_prototypes
        tokens2 = self.r2(quarter).flatten(2).transpose(1, 2)  # (B, N2, F)
        tokens3 = self.r3(half).flatten(2).transpose(1, 2)  # (B, N3, F3)
        # The R matrices p_i (C × F) are processed together: C·R queries, each attending on its own.
        queries = self.prototypes.to(tokens2.dtype).reshape(1, C * R, -1).expand(B, -1, -1)
        _, updated = self.block1(queries, tokens2, keep_attention)  # p_i^I: (B, C·R, F)
        logits, _ = self.block2(updated, tokens3)  # m_i^II: (B, C·R, N3)
        if self.normalize_proximity:
            logits = F.layer_norm(logits, logits.shape[-1:])  # per map, over its positions; no affine
        return logits.reshape(B, C, R, *half.shape[2:])

    def aggregate(self, proximity: Tensor) -> Tensor:
        """Eq. 6 without the up-sampling: ``(B, C, R, h, w, d)`` → ``(B, C, h, w, d)``."""
        B, C, R, *spatial = proximity.shape
        x = proximity.reshape(B * C, R, *spatial) if self.cross_class else proximity.reshape(B, C * R, *spatial)
        if self.sa is not None:
            x = self.sa(x)
        if self.sa_act is not None:
            x = self.sa_act(x)
        # CI off: the ablation baseline, the sum of the proximity maps over the R prototypes.
        x = self.ci(x) if self.ci is not None else x.reshape(-1, R, *spatial).sum(dim=1, keepdim=True)
        return x.reshape(B, C, *spatial)

    def forward(self, quarter: Tensor, half: Tensor, keep_attention: bool = False) -> Tensor:
        m = self.aggregate(self.proximity(quarter, half, keep_attention))
        if self.up is not None:
            m = self.up(m)
            return F.relu(m) if self.output_relu else m
        return F.interpolate(m, scale_factor=2, mode="trilinear", align_corners=False)


class Rectifier(nn.Module):
    """Turns a prediction and ``M(x)`` into a rectified distribution (eq. 8, eq. 17, Tab. 7).

    Args:
        variant: ``"learnable_v3"`` (eq. 8: ``y + (1 − μ)·M``, μ ∈ [0, 1] learned), ``"learnable_v2"``
            (Conv3×3×3 over the concatenation of ``y`` and ``M``), ``"fixed_v1"`` (eq. 17: take ``M``
            where ``y`` is unreliable and ``M`` more confident; no parameters).
        num_classes: C.
        space: ``"logits"``: add ``(1 − μ)·M`` to the logits and softmax; ``"probs"``: mix the
            probabilities, ``(softmax(y) + (1 − μ)·softmax(M)) / (2 − μ)``.
        mu_param: ``"clamp"`` (μ is the raw scalar, clamped to [0, 1] after each of its steps) or
            ``"sigmoid"`` (μ = sigmoid(raw)).
        mu_init: initial μ (in ``MU_SIGMOID_RANGE`` for ``"sigmoid"``).
        threshold: τ of eq. 17 (``fixed_v1`` only).

    ``forward(pred_logits, m)`` returns scores ``s`` ``(B, C, ...)`` whose softmax is the rectified
    distribution (logits for ``"logits"``, log-probabilities for ``"probs"``).
    """

    def __init__(
        self,
        variant: str,
        num_classes: int,
        *,
        space: str = "logits",
        mu_param: str = "clamp",
        mu_init: float = 0.0,
        threshold: float = 0.97,
    ) -> None:
        super().__init__()
        if variant not in RECTIFY_VARIANTS:
            raise ValueError(f"variant must be one of {RECTIFY_VARIANTS}, got {variant!r}")
        if space not in ("logits", "probs") or mu_param not in ("clamp", "sigmoid"):
            raise ValueError(f"bad space {space!r} or mu_param {mu_param!r}")
        self.variant, self.space, self.mu_param, self.threshold = variant, space, mu_param, threshold
        self.mu_raw: nn.Parameter | None = None
        self.conv: nn.Conv3d | None = None
        if variant == "learnable_v3":
            if mu_param == "sigmoid":
                low, high = MU_SIGMOID_RANGE
                if not low <= mu_init <= high:
                    raise ValueError(f"mu_init must be in [{low}, {high}] with mu_param='sigmoid', got {mu_init}")
                raw = math.log(mu_init / (1 - mu_init))
            else:
                raw = min(max(mu_init, 0.0), 1.0)
            self.mu_raw = nn.Parameter(torch.tensor(float(raw)))
        elif variant == "learnable_v2":
            self.conv = nn.Conv3d(2 * num_classes, num_classes, 3, padding=1)

    def mu(self) -> Tensor | None:
        """μ ∈ [0, 1] (``learnable_v3`` only)."""
        if self.mu_raw is None:
            return None
        return torch.sigmoid(self.mu_raw) if self.mu_param == "sigmoid" else self.mu_raw.clamp(0.0, 1.0)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the raw μ in [0, 1] after an optimiser step (``mu_param="clamp"``)."""
        if self.mu_raw is not None and self.mu_param == "clamp":
            self.mu_raw.clamp_(0.0, 1.0)

    def forward(self, pred_logits: Tensor, m: Tensor) -> Tensor:
        pred_logits, m = pred_logits.float(), m.float()
        if self.variant == "fixed_v1":
            p, q = pred_logits.softmax(1), m.softmax(1)
            pmax, qmax = p.amax(1, keepdim=True), q.amax(1, keepdim=True)
            take_m = (pmax < self.threshold) & (pmax < qmax)
            return torch.where(take_m, m, pred_logits)
        if self.space == "probs":
            p, q = pred_logits.softmax(1), m.softmax(1)
            if self.variant == "learnable_v2":
                assert self.conv is not None
                return self.conv(torch.cat([p, q], 1)).log_softmax(1)
            w = 1.0 - self.mu()  # type: ignore[operator]
            return ((p + w * q) / (1.0 + w)).clamp_min(1e-12).log()
        if self.variant == "learnable_v2":
            assert self.conv is not None
            return self.conv(torch.cat([pred_logits, m], 1))
        return pred_logits + (1.0 - self.mu()) * m  # type: ignore[operator]
