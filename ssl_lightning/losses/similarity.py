"""SimMatch's label propagation between class predictions and a labeled memory bank (specs/simmatch.md §3).

Everything is computed in float32 log-space: with t = 0.1 and K = 128,000 slots the smallest
similarity probability is about 1e-14, which log(softmax) in half precision turns into 0·(−inf) = NaN.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ssl_lightning.losses.consistency import _at_least_fp32


class PropagatedTargets(NamedTuple):
    """Teacher-side quantities of one step (all without gradient).

    weak_similarity: q^w = σ(⟨z^w, Z⟩ / t), (N, K).
    instance_target: q̂ = σ(⟨z^w, Z⟩ / t + log ū), ū_{b,i} = p̃_{b, y^Z_i}, (N, K).
    aggregated: a_{b,c} = Σ_i 1[y^Z_i = c] q^w_{b,i}, (N, C).
    semantic_target: p̂ (N, C); smooth: α p̃ + (1 − α) a; scale: norm₁(p̃ ⊙ a).
    """

    weak_similarity: torch.Tensor
    instance_target: torch.Tensor
    aggregated: torch.Tensor
    semantic_target: torch.Tensor


def similarity_logits(embeddings: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """s / t with s_{b,i} = ⟨z_b, Z_i⟩, in float32 (bf16 would put ~0.04 of error on each logit at t = 0.1)."""
    return _at_least_fp32(embeddings) @ _at_least_fp32(bank).T / temperature


def aggregate(weak_similarity: torch.Tensor, bank_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """a_{b,c} = Σ_i 1[y^Z_i = c] · q^w_{b,i}: the similarity mass of each class's bank slots."""
    index = bank_labels.expand(weak_similarity.shape[0], -1)
    return weak_similarity.new_zeros(weak_similarity.shape[0], num_classes).scatter_add_(1, index, weak_similarity)


def propagate(
    weak_embeddings: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    log_aligned_probs: torch.Tensor,
    temperature: float,
    alpha: float,
    fusion: Literal["smooth", "scale"] = "smooth",
) -> PropagatedTargets:
    """The teacher targets (T3)–(T7) from weak embeddings z^w (N, D), the bank Z (K, D) with labels
    y^Z (K,) and the aligned class log-probabilities log p̃ (N, C)."""
    with torch.no_grad():
        log_aligned_probs = _at_least_fp32(log_aligned_probs)
        num_classes = log_aligned_probs.shape[1]
        weak_logits = similarity_logits(weak_embeddings, bank, temperature)
        weak_similarity = weak_logits.softmax(dim=1)
        # Unfolding: each slot takes the aligned probability of its label; scaling in log-space.
        log_unfolded = log_aligned_probs[:, bank_labels]
        instance_target = (weak_logits + log_unfolded).softmax(dim=1)
        aggregated = aggregate(weak_similarity, bank_labels, num_classes)
        if fusion == "smooth":
            semantic_target = alpha * log_aligned_probs.exp() + (1.0 - alpha) * aggregated
        elif fusion == "scale":
            semantic_target = (log_aligned_probs + (aggregated + 1e-12).log()).softmax(dim=1)
        else:
            raise ValueError(f"semantic fusion must be 'smooth' or 'scale', got {fusion!r}")
        return PropagatedTargets(weak_similarity, instance_target, aggregated, semantic_target)


def soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """H(target, σ(logits)) per row = −Σ_c target_c · log_softmax(logits)_c, in float32."""
    return -(_at_least_fp32(target) * F.log_softmax(_at_least_fp32(logits), dim=-1)).sum(dim=-1)


def semantic_consistency(
    semantic_target: torch.Tensor, strong_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """L_u = (1/N) Σ_b w_b · H(p̂_b, σ(ℓ^s_b)): masked samples count as 0, the mean runs over all N."""
    return (soft_cross_entropy(semantic_target, strong_logits) * mask).mean()


def instance_consistency(
    instance_target: torch.Tensor, strong_embeddings: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """L_in = (1/N) Σ_b H(q̂_b, q^s_b) with q^s = σ(⟨z^s, sg(Z)⟩ / t); no mask."""
    strong_logits = similarity_logits(strong_embeddings, bank.detach(), temperature)
    return soft_cross_entropy(instance_target, strong_logits).mean()
