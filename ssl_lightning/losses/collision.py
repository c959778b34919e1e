"""Collision cross-entropy, its self-labelling objectives and the clustering baselines' network losses.

Collision cross-entropy (Zhang & Boykov, arXiv 2303.07321; specs/collision_ce.md §3):

    H₂(y, σ) = −ln Σ_k y_k σ_k

is the negative log-probability that a class drawn from the prediction σ and one drawn from the soft
label y coincide. Every torch function here upcasts half-precision inputs to float32 (float64 stays
float64, for exact tests) and reduces over the last dimension. The baseline losses (MIGD, IMSAT, IIC)
take the whole, already globally gathered batch, so every DDP rank computes the same global loss.

``self_labelling_objective`` evaluates the y-step objectives (5), (10), (11) in float64 NumPy; the
solvers use it for stopping and statistics.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ssl_lightning.losses.consistency import _at_least_fp32

Reduction = Literal["mean", "sum", "none"]
SelfLabellingLoss = Literal["collision", "collision_fwd", "miadm"]

# ȳ is clamped here inside every logarithm: an empty cluster would otherwise make the fairness term
# (and its gradient) infinite.
MEAN_FLOOR = 1e-12
# Smallest positive normal float64: ln of it is finite (≈ −708), so a zero prediction under a positive
# label gives a huge but finite MIADM cost instead of inf·0 = NaN.
_TINY64 = float(np.finfo(np.float64).tiny)


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")


def collision_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                            reduction: Reduction = "mean") -> torch.Tensor:
    """Collision cross-entropy between soft targets y and softmax(z), from logits.

        H₂(y, softmax z) = −ln Σ_k y_k softmax(z)_k = logsumexp_k(z_k) − logsumexp_k(z_k + ln y_k)

    with ln 0 = −inf, so exact zeros in y simply drop out. The probability-space form would underflow
    the dot product for confident logits (and lose everything in half precision); both logsumexps are
    shift-invariant and stay finite for logits of any size. ∂H₂/∂z_j = σ_j (1 − y_j / σᵀy): zero for
    y = u, and softmax(z) − y (Shannon's) for one-hot y.

    Args:
        logits: (..., K) logits z.
        targets: (..., K) soft labels y, rows on the simplex (zeros allowed); treated as constants.
        reduction: "mean" or "sum" over all rows, or "none" for the per-row values (...,).
    """
    _check_pair(logits, targets)
    z = _at_least_fp32(logits)
    log_y = torch.log(targets.to(z.dtype))
    values = torch.logsumexp(z, dim=-1) - torch.logsumexp(z + log_y, dim=-1)
    return _reduce(values, reduction)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Shannon cross-entropy with soft targets: H(y, σ) = −Σ_k y_k ln softmax(z)_k.

    Its minimiser over σ for fixed y is σ = y (the prediction copies the label's uncertainty), unlike
    H₂, whose minimiser is the vertex at argmax y.
    """
    _check_pair(logits, targets)
    z = _at_least_fp32(logits)
    values = -(targets.to(z.dtype) * F.log_softmax(z, dim=-1)).sum(dim=-1)
    return _reduce(values, reduction)


def collision_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Rényi entropy of order 2 (collision entropy), per row: R₂(p) = −ln Σ_k p_k². Equals H₂(p, p)."""
    p = _at_least_fp32(probs)
    return -torch.log(p.square().sum(dim=-1))


def fairness_kl(mean_probs: torch.Tensor, direction: Literal["forward", "reverse"]) -> torch.Tensor:
    """Fairness divergence between the batch-mean prediction ȳ and the uniform prior u_k = 1/K.

        forward:  KL(ȳ ‖ u) = Σ_k ȳ_k ln(K ȳ_k)          (losses (5) and (10), MIGD)
        reverse:  KL(u ‖ ȳ) = −ln K − (1/K) Σ_k ln ȳ_k   (loss (11))

    ȳ is clamped ≥ 1e-12 inside the logarithms (an empty cluster stays finite; 0·ln 0 counts as 0 in
    the forward direction). Reduces the last dimension.
    """
    q = _at_least_fp32(mean_probs)
    num_classes = q.shape[-1]
    log_q = torch.log(q.clamp_min(MEAN_FLOOR))
    if direction == "forward":
        return (q * (log_q + math.log(num_classes))).sum(dim=-1)
    if direction == "reverse":
        return -math.log(num_classes) - log_q.mean(dim=-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def _row_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _entropy_of_mean(probs: torch.Tensor) -> torch.Tensor:
    mean = probs.mean(dim=0)
    return -(mean * torch.log(mean.clamp_min(MEAN_FLOOR))).sum()


def migd_loss(logits: torch.Tensor, fairness_weight: float = 1.3) -> torch.Tensor:
    """MIGD (mutual-information gradient descent, the paper's loss (1)) on the whole batch.

        L = (1/B) Σ_i H(σ_i) + w · KL(σ̄ ‖ u),   σ̄ = (1/B) Σ_i σ_i

    Since KL(σ̄‖u) = ln K − H(σ̄), w = 1 is the negative mutual-information estimate up to a constant.
    """
    z = _at_least_fp32(logits)
    log_probs = F.log_softmax(z, dim=-1)
    return _row_entropy(log_probs).mean() + fairness_weight * fairness_kl(log_probs.exp().mean(dim=0), "forward")


def imsat_loss(logits: torch.Tensor, logits_aug: torch.Tensor, lam: float = 0.1, mu: float = 4.0) -> torch.Tensor:
    """IMSAT with the augmented view in place of VAT, on the whole batch.

        L = (1/B) Σ_i KL(sg σ_i ‖ σ′_i) + λ [ (1/B) Σ_i H(σ_i) − μ H(σ̄) ]

    sg stops the gradient through the clean prediction in the consistency term only (the reference
    code treats it as the target); the entropies are differentiated.
    """
    _check_pair(logits, logits_aug)
    log_p = F.log_softmax(_at_least_fp32(logits), dim=-1)
    log_q = F.log_softmax(_at_least_fp32(logits_aug), dim=-1)
    target = log_p.detach()
    consistency = (target.exp() * (target - log_q)).sum(dim=-1).mean()
    return consistency + lam * (_row_entropy(log_p).mean() - mu * _entropy_of_mean(log_p.exp()))


def iic_loss(logits: torch.Tensor, logits_aug: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Invariant information clustering: the negative mutual information of the paired cluster joint.

        P = sym((1/B) Σ_i σ_i σ′_iᵀ) / total,   L = −Σ_{c,c′} P_cc′ [ln P_cc′ − ln P_c − ln P_c′]

    sym(M) = (M + Mᵀ)/2. The marginals come from the unclamped joint; P_cc′, P_c, P_c′ are then clamped
    ≥ ε inside the loss (as the IIC reference does), so empty cells contribute ε ln ε, not NaN.
    """
    _check_pair(logits, logits_aug)
    p = F.softmax(_at_least_fp32(logits), dim=-1)
    q = F.softmax(_at_least_fp32(logits_aug), dim=-1)
    joint = p.T @ q / p.shape[0]
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    row = joint.sum(dim=1, keepdim=True).clamp_min(eps)
    col = joint.sum(dim=0, keepdim=True).clamp_min(eps)
    joint = joint.clamp_min(eps)
    return -(joint * (torch.log(joint) - torch.log(row) - torch.log(col))).sum()


@torch.no_grad()
def sinkhorn_pseudo_labels(probs: torch.Tensor, lam: float = 25.0, tol: float = 1e-3,
                           max_iters: int = 100) -> torch.Tensor:
    """SeLa hard pseudo-labels: equipartition of the batch by Sinkhorn–Knopp on Q ∝ σ^λ.

    Finds scalings r (clusters) and c (samples) such that Q_ik = σ_ik^λ r_k c_i has row sums 1/N and
    column sums 1/K, then labels ŷ_i = argmax_k Q_ik. It runs in float64 in the log domain: σ^25 of a
    confident row underflows in linear space. Each iteration rescales columns then rows (rows are then
    exact); it stops when max_k |K·colsum_k − 1| < tol or after max_iters iterations.

    Args:
        probs: (N, K) predictions σ (rows on the simplex); zeros are allowed.
        lam: the power λ (SeLa's reference value 25).

    Returns:
        (N,) int64 labels, no gradient.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {tuple(probs.shape)}")
    n, k = probs.shape
    log_q = lam * torch.log(probs.to(torch.float64).clamp_min(_TINY64))
    log_r = torch.zeros(k, dtype=torch.float64, device=probs.device)
    log_c = torch.zeros(n, 1, dtype=torch.float64, device=probs.device)
    for _ in range(max_iters):
        log_r = -math.log(k) - torch.logsumexp(log_q + log_c, dim=0)
        log_c = -math.log(n) - torch.logsumexp(log_q + log_r, dim=1, keepdim=True)
        column_mass = torch.logsumexp(log_q + log_r + log_c, dim=0).exp()
        if (column_mass * k - 1).abs().max() < tol:
            break
    return (log_q + log_r).argmax(dim=1)


def self_labelling_objective(probs: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, lam_eff: float,
                             loss: SelfLabellingLoss) -> float:
    """The y-step objective F(y) for fixed predictions σ, in float64 (specs/collision_ce.md §3.2).

        (11) collision:      F = −(1/N) Σ_i ln σ_iᵀy_i − λ̃ Σ_k u_k ln ȳ_k
        (10) collision_fwd:  F = −(1/N) Σ_i ln σ_iᵀy_i + λ̃ KL(ȳ ‖ u)
        (5)  miadm:          F = −(1/N) Σ_i Σ_k y_ik ln σ_ik + λ̃ KL(ȳ ‖ u)

    (11) drops the constant −λ̃ ln K of KL(u‖ȳ), so F ≥ λ̃ ln K there. ȳ is clamped ≥ 1e-12 inside the
    logarithms; in (5), 0·ln 0 counts as 0 and σ is floored at the smallest normal float64.

    Args:
        probs: (N, K) predictions σ. y: (N, K) pseudo-labels. lam_eff: the effective fairness weight λ̃.
    """
    sigma = _as_float64(probs)
    labels = _as_float64(y)
    if sigma.shape != labels.shape or sigma.ndim != 2:
        raise ValueError(f"probs and y must be (N, K) arrays of one shape, got {sigma.shape} and {labels.shape}")
    num_classes = sigma.shape[1]
    mean_label = np.maximum(labels.mean(axis=0), MEAN_FLOOR)
    if loss == "miadm":
        ce = -np.where(labels > 0, labels * np.log(np.maximum(sigma, _TINY64)), 0.0).sum(axis=1)
        fit = float(ce.mean())
    elif loss in ("collision", "collision_fwd"):
        with np.errstate(divide="ignore"):
            fit = float(-np.log(np.einsum("ik,ik->i", sigma, labels)).mean())
    else:
        raise ValueError(f"loss must be 'collision', 'collision_fwd' or 'miadm', got {loss!r}")
    if loss == "collision":
        fairness = -float(np.log(mean_label).mean())
    else:
        fairness = float((labels.mean(axis=0) * np.log(num_classes * mean_label)).sum())
    return fit + lam_eff * fairness


def _as_float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)
