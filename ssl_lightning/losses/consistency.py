"""Consistency losses between views: z-scored logit alignment, InfoNCE and pseudo-label cross-entropies.

All functions are pure: tensors in, a scalar tensor out, no state. Inputs in half precision are
upcast to float32 before any reduction; float64 inputs stay float64 (useful for exact tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 lose the small differences these losses measure; fp64 is kept for exact tests.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def zscore(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise z-score over the class dimension with the unbiased standard deviation.

        z(v) = (v − v̄) / max(σ_{C−1}(v), ε),   σ²_{C−1}(v) = 1/(C−1) Σ_k (v_k − v̄)²

    The guard is applied as sqrt(max(σ², ε²)), which equals max(σ, ε) but keeps the gradient finite on
    constant rows (the derivative of sqrt at 0 would be infinite).

    Args:
        logits: (N, C) with C ≥ 2.
        eps: lower bound ε of the denominator.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    x = _at_least_fp32(logits)
    centred = x - x.mean(dim=1, keepdim=True)
    variance = centred.square().sum(dim=1, keepdim=True) / (x.shape[1] - 1)
    return centred / variance.clamp_min(eps * eps).sqrt()


def zscore_mse(logits_a: torch.Tensor, logits_b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """InfoMatch's alignment term between two views' logits.

        L = 1/(N·C) Σ_i ‖z(a_i) − z(b_i)‖² = (2(C−1)/C) · (1 − (1/N) Σ_i ρ_i)

    where ρ_i is the Pearson correlation of a_i and b_i (the identity holds for the unbiased std and rows
    that are not constant). Hence 0 ≤ L ≤ 4(C−1)/C, and L is invariant to v ↦ a·v + b (a > 0) per row.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    return (zscore(logits_a, eps) - zscore(logits_b, eps)).square().mean()


def info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    z_a_all: torch.Tensor | None = None,
    z_b_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric cross-view InfoNCE on unit-normalised embeddings.

    Single process (defaults), with ẑ = z/‖z‖ and S_ij = ⟨ẑ^a_i, ẑ^b_j⟩ / τ:

        L = 1/(2N) Σ_i [ −log softmax_j(S_ij)|_{j=i} − log softmax_j(S_ji)|_{j=i} ]

    and I(a; b) ≥ log N − L per direction. Distributed layout: ``z_a``/``z_b`` are this rank's n anchors,
    ``z_a_all``/``z_b_all`` the M global candidates (e.g. all-gathered with gradients) and ``offset`` the
    index of this rank's first sample among them, so anchor i's positive is candidate offset + i:

        L = 1/(2n) Σ_i [ −log softmax_j(⟨ẑ^a_i, ẑ^b_all,j⟩/τ)|_{j=offset+i}
                         −log softmax_j(⟨ẑ^b_i, ẑ^a_all,j⟩/τ)|_{j=offset+i} ]

    Averaging the per-rank losses (as DDP averages gradients) gives the single-process loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"z_a and z_b must be (N, D) of equal shape, got {tuple(z_a.shape)}, {tuple(z_b.shape)}"
        )
    if (z_a_all is None) != (z_b_all is None):
        raise ValueError("give both z_a_all and z_b_all, or neither")
    # Normalise and score in fp32: bf16 cosine similarities divided by τ = 0.2 lose most of their digits.
    anchors_a = F.normalize(_at_least_fp32(z_a), dim=1)
    anchors_b = F.normalize(_at_least_fp32(z_b), dim=1)
    if z_a_all is None or z_b_all is None:
        candidates_a, candidates_b = anchors_a, anchors_b
    else:
        if z_a_all.shape != z_b_all.shape or z_a_all.shape[1:] != z_a.shape[1:]:
            raise ValueError(f"candidate shapes {tuple(z_a_all.shape)}, {tuple(z_b_all.shape)} do not match")
        candidates_a = F.normalize(_at_least_fp32(z_a_all), dim=1)
        candidates_b = F.normalize(_at_least_fp32(z_b_all), dim=1)
    n = z_a.shape[0]
    if offset < 0 or offset + n > candidates_a.shape[0]:
        raise ValueError(f"offset {offset} + {n} anchors exceeds {candidates_a.shape[0]} candidates")
    targets = torch.arange(offset, offset + n, device=z_a.device)
    loss_ab = F.cross_entropy(anchors_a @ candidates_b.T / temperature, targets)
    loss_ba = F.cross_entropy(anchors_b @ candidates_a.T / temperature, targets)
    return 0.5 * (loss_ab + loss_ba)


def masked_cross_entropy(
    logits: torch.Tensor, pseudo_labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Pseudo-label cross-entropy averaged over all N samples, rejected ones counting as zeros.

        L = (1/N) Σ_i mask_i · CE(ℓ_i, ŷ_i),   CE(ℓ, y) = −log softmax(ℓ)_y

    ``mask`` may be float or bool; it is treated as a constant.
    """
    logits = _at_least_fp32(logits)
    per_sample = F.cross_entropy(logits, pseudo_labels, reduction="none")
    # Divisor N, not Σ mask: the step size of the unlabelled term must not grow as the mask empties.
    return (mask.detach().to(per_sample.dtype) * per_sample).sum() / max(logits.shape[0], 1)


def cutmix_cross_entropy(
    logits_mixed: torch.Tensor,
    pseudo_labels: torch.Tensor,
    mask: torch.Tensor,
    lam: torch.Tensor,
    partner_labels: torch.Tensor,
    partner_mask: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of CutMix images against both sources' pseudo-labels, each gated by its own mask.

        L = (1/N) Σ_i [ λ_i·mask_i·CE(ℓ_i, ŷ_i) + (1 − λ_i)·mask_π(i)·CE(ℓ_i, ŷ_π(i)) ]

    with ℓ_i the logits of ũ_i = (1 − M_i)⊙w_i + M_i⊙w_π(i) and λ_i = 1 − mean(M_i). The partner's
    pseudo-label ŷ_π(i) and mask mask_π(i) are passed in (``partner_labels``, ``partner_mask``) because
    the partner may live on another rank. λ and the masks are constants; λ is cast to the loss dtype so
    that a float64 λ cannot promote the loss.
    """
    logits = _at_least_fp32(logits_mixed)
    own = F.cross_entropy(logits, pseudo_labels, reduction="none")
    partner = F.cross_entropy(logits, partner_labels, reduction="none")
    mask = mask.detach().to(own.dtype)
    partner_mask = partner_mask.detach().to(own.dtype)
    lam = lam.detach().to(own.dtype)
    per_sample = lam * mask * own + (1.0 - lam) * partner_mask * partner
    return per_sample.sum() / max(logits.shape[0], 1)
