"""Collaborative Positive Supervision (CPS): CRLN's contrastive term (paper Sec. 3.3, eq. 9–14).

For each class c, anchors are uncertain voxels of class c (eq. 9–10), negatives are voxels
confidently of another class (eq. 11–12) and the single positive is the "unassertive" centre
``(r_m + ξ·mean(P^c)) / (1 + ξ)`` (eq. 13); the loss is InfoNCE with cosine similarity and
temperature t (eq. 14). Sampling uses torch's CPU random generator, so a resumed run draws the
same voxels as a straight one. See ``docs/method.md`` for the decisions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crln.collectives import all_reduce_sum_

__all__ = ["CPSHead", "CPSSample", "cps_loss", "gather_voxels", "positive_prototypes", "sample_cps"]


class CPSHead(nn.Module):
    """Projection ``r = Conv1×1(ReLU(BN(Conv3×3(f4))))`` of the full-resolution decoder features (eq. 9)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, F, H, W, D)`` → ``(B, out, H, W, D)``."""
        return self.layers(x)


def positive_prototypes(prototypes: Tensor, reduce: str) -> Tensor:
    """``mean(P^c)`` of eq. 13 for every class: ``(C, R, F)`` → ``(C, F)`` (``"prototypes"``: mean
    over the R prototypes, the paper) or ``(C, R)`` (``"features"``: mean over the feature axis,
    what the authors' code does with its R-channel projection)."""
    if reduce == "prototypes":
        return prototypes.mean(dim=1)
    if reduce == "features":
        return prototypes.mean(dim=2)
    raise ValueError(f"reduce must be 'prototypes' or 'features', got {reduce!r}")


class CPSSample:
    """Sampled indices of one class: flat voxel indices into ``rep.permute(0,2,3,4,1).reshape(-1, D)``."""

    def __init__(self, cls: int, anchors: Tensor, negatives: Tensor) -> None:
        self.cls = cls
        self.anchors = anchors  # (A,)
        self.negatives = negatives  # (A, K) per-anchor negatives, or (1, K) shared by all anchors


def _draw(candidates: Tensor, count: int, rows: int, with_replacement: bool) -> Tensor:
    """``rows × count`` indices drawn from ``candidates`` (CPU RNG); without replacement: at most
    ``len(candidates)`` distinct indices, one row."""
    n = candidates.numel()
    pick = torch.randint(n, (rows, count)) if with_replacement else torch.randperm(n)[:count].unsqueeze(0)
    return candidates[pick.to(candidates.device)]


@torch.no_grad()
def sample_cps(
    valid: Tensor,
    student_probs: Tensor,
    threshold: float,
    num_anchors: int,
    num_negatives: int,
    with_replacement: bool = True,
) -> list[CPSSample]:
    """Anchor and negative indices per class (eq. 9–12).

    Args:
        valid: ``(B, C, H, W, D)`` bool; ``valid[:, c]`` is the set of voxels trusted to be class c:
            labelled ``y = c``; unlabelled ``argmax ȳ_r = c`` and ``max ȳ_r > τ_w``.
        student_probs: ``(B, C, H, W, D)`` student probabilities ŷ.
        threshold: τ; anchors of class c are valid voxels with ``ŷ_c < τ`` (eq. 10).
        num_anchors, num_negatives: how many per class (with replacement: exactly that many, one
            negative set per anchor; without: at most that many, one negative set shared by all anchors).

    Returns:
        One :class:`CPSSample` per class that has anchors and negatives.
    """
    C = valid.shape[1]
    flat_valid = valid.permute(0, 2, 3, 4, 1).reshape(-1, C)
    flat_probs = student_probs.permute(0, 2, 3, 4, 1).reshape(-1, C)
    out = []
    for c in range(C):
        anchor_idx = torch.nonzero(flat_valid[:, c] & (flat_probs[:, c] < threshold)).squeeze(1)
        others = torch.cat([flat_valid[:, :c], flat_valid[:, c + 1 :]], dim=1).any(dim=1)
        negative_idx = torch.nonzero(others & ~flat_valid[:, c]).squeeze(1)
        if anchor_idx.numel() == 0 or negative_idx.numel() == 0:
            continue
        anchors = _draw(anchor_idx, num_anchors, 1, with_replacement).reshape(-1)
        negatives = _draw(negative_idx, num_negatives, anchors.numel() if with_replacement else 1, with_replacement)
        out.append(CPSSample(c, anchors, negatives))
    return out


def gather_voxels(rep: Tensor, index: Tensor) -> Tensor:
    """Features of flat voxel indices ``b·N + n`` of ``rep`` ``(B, D, *spatial)``: ``index.shape + (D,)``.

    ``index_select`` on the voxel-major view (a view for channels-last tensors): its backward is an
    ``index_add_`` that accumulates repeated indices in a fixed order, so training stays bit-reproducible
    (advanced indexing accumulates them in a thread-dependent order on CPU).
    """
    flat = rep.permute(0, 2, 3, 4, 1).reshape(-1, rep.shape[1])
    return flat.index_select(0, index.reshape(-1)).reshape(*index.shape, rep.shape[1])


def cps_loss(
    rep: Tensor,
    valid: Tensor,
    samples: list[CPSSample],
    prototype_term: Tensor | None,
    xi: float,
    temperature: float,
    unit_mix: bool = False,
) -> Tensor:
    """Eq. 13–14: InfoNCE of each anchor against its positive and negatives, cosine similarity / t.

    Args:
        rep: ``(B, D, H, W, D)`` projected features r (with gradient).
        valid: as in :func:`sample_cps`; defines the class means r_m (computed without gradient).
        samples: from :func:`sample_cps`.
        prototype_term: ``(C, D)`` ``mean(P^c)`` per class, or ``None`` for the positive = r_m
            ablation ("MR"); gradients reach P through it unless the caller detached it.
        xi: ξ of eq. 13; the positive is ``(r_m + ξ·mean(P^c)) / (1 + ξ)``. ``xi = inf`` means the
            prototype alone ("LP").
        temperature: t.
        unit_mix: mix the unit vectors of r_m and mean(P^c) instead of the raw vectors. The loss compares
            directions (cosine), and raw prototypes are far smaller than r_m (N(0, 0.02²) init, kept small
            by the LayerNorm's scale invariance and weight decay), so a raw mix points where r_m does.

    Returns:
        Mean over classes with valid voxels of the mean over anchors (the authors' reduction); a
        zero that keeps the graph when no class has both anchors and negatives.
    """
    flat = rep.permute(0, 2, 3, 4, 1).reshape(-1, rep.shape[1])  # (B·N, D): one copy, a view for channels-last rep
    with torch.no_grad():
        flat_valid = valid.permute(0, 2, 3, 4, 1).reshape(-1, valid.shape[1]).float()  # (B·N, C)
        counts = flat_valid.sum(dim=0)  # (C,)
        sums = flat_valid.T @ flat.detach().float()  # (C, D)
        # Data parallel: r_m and the classes present are those of the global batch. Every process reduces,
        # samples or not, so that the collective always pairs up.
        all_reduce_sum_([sums, counts])
        class_means = sums / counts.clamp_min(1.0).unsqueeze(1)  # r_m per class
    present = int((counts > 0).sum())
    if not samples:
        return rep.sum() * 0.0
    # One gather for every class: its backward is a single index_add_ into one gradient buffer.
    index = torch.cat([t.reshape(-1) for s in samples for t in (s.anchors, s.negatives)])
    voxels = F.normalize(flat.index_select(0, index).float(), dim=1)
    total = rep.new_zeros((), dtype=torch.float32)
    offset = 0
    for s in samples:
        anchors = voxels[offset : offset + s.anchors.numel()]  # (A, D)
        offset += s.anchors.numel()
        negatives = voxels[offset : offset + s.negatives.numel()].reshape(*s.negatives.shape, -1)  # (A|1, K, D)
        offset += s.negatives.numel()
        r_m = class_means[s.cls]
        if prototype_term is None:
            positive = r_m
        elif xi == float("inf"):
            positive = prototype_term[s.cls].float()
        else:
            prototype = prototype_term[s.cls].float()
            if unit_mix:
                r_m, prototype = F.normalize(r_m, dim=0), F.normalize(prototype, dim=0)
            positive = (r_m + xi * prototype) / (1.0 + xi)
        pos_logit = (anchors @ F.normalize(positive, dim=0)).unsqueeze(1)  # (A, 1)
        neg_logit = torch.einsum("ad,akd->ak", anchors, negatives.expand(anchors.shape[0], -1, -1))
        logits = torch.cat([pos_logit, neg_logit], dim=1) / temperature
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        total = total + F.cross_entropy(logits, target)
    return total / max(present, 1)
