"""Entropy weighting, sharpening and per-sample divergences for uwbssl (specs/bhattacharyya.md §3.2, §3.5).

Everything is evaluated from log-probabilities, in float32 at least (float64 inputs stay float64): a
one-hot target has log q̃_k = −inf, and the probability-space forms would then produce 0·log 0 = NaN in
the entropy and the KL, or an infinite gradient of √q̃_k p_k in the Bhattacharyya coefficient.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ssl_lightning.losses.consistency import _at_least_fp32

Divergence = Literal["bhattacharyya", "kl", "js", "hellinger", "tv"]

DIVERGENCES: tuple[str, ...] = get_args(Divergence)


def _finite_or_zero(log_probs: torch.Tensor) -> torch.Tensor:
    # Replacing −inf *before* the product (not masking after it) keeps 0·(−inf) out of both the forward
    # and the backward pass; a `where` applied afterwards still back-propagates NaN into the dead branch.
    return torch.where(torch.isneginf(log_probs), torch.zeros_like(log_probs), log_probs)


def normalized_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last dimension, divided by its maximum log C.

        e = H / log C,   H = −Σ_k exp(ℓ_k) ℓ_k,   with 0·log 0 = 0

    Args:
        log_probs: (..., C) normalised log-probabilities ℓ, C ≥ 2; entries may be −inf.

    Returns:
        e of shape (...,), in [0, 1]: 0 for a one-hot row, 1 for the uniform row.
    """
    num_classes = log_probs.shape[-1] if log_probs.ndim else 0
    if num_classes < 2:
        raise ValueError(
            f"log_probs must have C >= 2 classes on the last dim, got shape {tuple(log_probs.shape)}"
        )
    log_probs = _at_least_fp32(log_probs)
    entropy = -(log_probs.exp() * _finite_or_zero(log_probs)).sum(dim=-1)
    # Rounding can put a uniform row a few ulps above 1 (or a one-hot row at −0), which would push
    # w = 4e(1 − e) just outside [0, 1]; the exact value is in [0, 1] by Gibbs' inequality.
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def uncertainty_weight(normalized_entropy: torch.Tensor) -> torch.Tensor:
    """The bell-shaped uncertainty weight of the paper.

        w = 4 e (1 − e) ∈ [0, 1]   for e ∈ [0, 1]

    w(0) = w(1) = 0 and w(½) = 1: moderately uncertain samples get the most weight, confident and
    near-uniform ones the least. Same shape as the input.
    """
    e = _at_least_fp32(normalized_entropy)
    return 4.0 * e * (1.0 - e)


def sharpen_log(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """ReMixMatch sharpening q̃_k = q_k^{1/T} / Σ_j q_j^{1/T}, evaluated in log space.

        log q̃ = log q / T − logsumexp_j(log q_j / T)

    T = 1 is the identity (up to renormalisation); T → 0 tends to the one-hot of argmax q (uniform over
    tied maxima). With q = softmax(z) this equals log_softmax(z / T). Entries of −inf stay −inf.

    Args:
        log_probs: (..., C) log-probabilities, not all −inf in a row.
        temperature: T > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = _at_least_fp32(log_probs) / temperature
    # Subtracting the logsumexp (not exponentiating q^{1/T}) keeps fp32 finite: at logits ±80 and
    # T = 0.5 the scaled log-probabilities reach −320, far below fp32's exp underflow.
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def _masked_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_k a_k (log a_k − log b_k) over the last dim, with the a_k = 0 terms set to 0."""
    a = log_a.exp()
    # xlogy convention: where a_k = 0 (log a_k = −inf, or underflow) the term is 0 even if log b_k is
    # also tiny; the difference is zeroed before the product so that no NaN reaches the backward pass.
    difference = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_b))
    return (a * difference).sum(dim=-1)


def _log_bhattacharyya_coefficient(log_target: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    # log BC = logsumexp_k ½(log q̃_k + log p_k). No √ of probabilities (infinite gradient at p_k = 0) and
    # no clamp of BC: a clamp would zero the gradient exactly when the supports are nearly disjoint,
    # which is when the term is needed most. The gradient wrt the logits stays in [−½, ½].
    return torch.logsumexp(0.5 * (log_target + log_p), dim=-1)


def divergence(
    log_target: torch.Tensor, logits: torch.Tensor, kind: Divergence = "bhattacharyya"
) -> torch.Tensor:
    """Per-sample divergence D(q̃ ‖ p) between a constant target q̃ = exp(log_target) and p = softmax(logits).

    ``log_target`` is detached (q̃ is a stop-gradient target); the gradient flows into ``logits`` only.
    With BC = Σ_k √(q̃_k p_k) and log BC = logsumexp_k(½ log q̃_k + ½ log p_k):

        bhattacharyya:  D_B = −log BC
        kl:             KL(q̃ ‖ p) = Σ_k q̃_k (log q̃_k − log p_k),   0·log 0 = 0
        js:             ½ KL(q̃ ‖ M) + ½ KL(p ‖ M),   M = ½(q̃ + p),
                        log M = logaddexp(log q̃, log p) − log 2
        hellinger:      H² = 1 − BC = ½ Σ_k (√q̃_k − √p_k)²   (squared: √(1 − BC) has an unbounded
                        gradient at q̃ = p)
        tv:             TV = ½ Σ_k |q̃_k − p_k|   (W₁ under the 0–1 ground metric, hence invariant to
                        relabelling classes; it is *not* the 1-D Wasserstein distance over class indices)

    Facts: H² ≤ D_B ≤ ½ min(KL(q̃‖p), KL(p‖q̃)), D_B = −log(1 − H²), JS ≤ log 2, H² ≤ 1, TV ≤ 1;
    ∂D_B/∂z_j = ½(p_j − √(q̃_j p_j)/BC) and ∂KL/∂z_j = p_j − q̃_j.

    Args:
        log_target: (..., C) log q̃, normalised; −inf entries (one-hot targets) are allowed.
        logits: (..., C) unnormalised student logits z.
        kind: one of ``DIVERGENCES``.

    Returns:
        (...,) per-sample divergences, in float32 (float64 if either input is float64).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid kinds are {', '.join(DIVERGENCES)}")
    if log_target.shape != logits.shape or logits.ndim < 1:
        raise ValueError(
            f"log_target and logits must have the same shape (..., C), got {tuple(log_target.shape)}, "
            f"{tuple(logits.shape)}"
        )
    log_target = _at_least_fp32(log_target.detach())
    logits = _at_least_fp32(logits)
    dtype = torch.promote_types(log_target.dtype, logits.dtype)
    log_target = log_target.to(dtype)
    log_p = F.log_softmax(logits.to(dtype), dim=-1)

    if kind == "bhattacharyya":
        return -_log_bhattacharyya_coefficient(log_target, log_p)
    if kind == "hellinger":
        # −expm1 keeps the digits of 1 − BC when BC ≈ 1, i.e. near convergence.
        return -torch.expm1(_log_bhattacharyya_coefficient(log_target, log_p))
    if kind == "kl":
        return _masked_kl(log_target, log_p)
    if kind == "js":
        log_mixture = torch.logaddexp(log_target, log_p) - math.log(2.0)
        return 0.5 * (_masked_kl(log_target, log_mixture) + _masked_kl(log_p, log_mixture))
    # tv: no log or √ is involved, so probability space is exact enough and has a bounded gradient.
    return 0.5 * (log_target.exp() - log_p.exp()).abs().sum(dim=-1)
