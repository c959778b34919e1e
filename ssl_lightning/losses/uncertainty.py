"""uwbssl's unlabeled objective: uncertainty-weighted, entropy-gated CE plus a divergence term
(specs/bhattacharyya.md §3.4–3.6)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ssl_lightning.losses.divergences import (
    Divergence,
    divergence,
    normalized_entropy,
    sharpen_log,
    uncertainty_weight,
)

WeightMode = Literal["max_conf", "literal", "none", "conf_only"]
TargetMode = Literal["hybrid", "hard", "soft"]


class UnlabeledTerms(NamedTuple):
    """L_u and its per-sample ingredients (all without gradient except ``loss``, ``ce`` and ``div``)."""

    loss: torch.Tensor
    ce: torch.Tensor  # (1/N) Σ g ω ℓ^CE
    div: torch.Tensor  # (1/N) Σ g β ℓ^D (before λ_B)
    entropy: torch.Tensor  # e
    weight: torch.Tensor  # w
    confident: torch.Tensor  # c
    gate: torch.Tensor  # g
    ce_weight: torch.Tensor  # ω
    pseudo_labels: torch.Tensor  # ŷ


def weights_for(mode: WeightMode, weight: torch.Tensor, confident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω, β) of §3.4: max_conf (max(w, c), w), literal (w, w), none (1, 1), conf_only (c, 0)."""
    if mode == "max_conf":
        return torch.maximum(weight, confident), weight
    if mode == "literal":
        return weight, weight
    if mode == "none":
        return torch.ones_like(weight), torch.ones_like(weight)
    if mode == "conf_only":
        return confident, torch.zeros_like(weight)
    raise ValueError(f"unknown weight_mode {mode!r}; use max_conf, literal, none or conf_only")


def uwbssl_unlabeled_loss(
    log_weak: torch.Tensor,
    strong_logits: torch.Tensor,
    entropy_mask: torch.Tensor,
    threshold: float = 0.95,
    temperature: float = 0.5,
    lambda_b: float = 1.0,
    kind: Divergence = "bhattacharyya",
    weight_mode: WeightMode = "max_conf",
    target_mode: TargetMode = "hybrid",
    confident_bypass: bool = True,
    unit_divergence_weight: bool = False,
) -> UnlabeledTerms:
    """L_u = (1/N) Σ_i g_i [ω_i ℓ^CE_i + λ_B β_i ℓ^D_i] over all N unlabeled samples.

    ``log_weak`` is log q̂ (weak view, after any alignment; no gradient), ``entropy_mask`` m_i ∈ {0, 1}.
    e = H(q̂)/log C, w = 4e(1 − e), c = 1[max q̂ ≥ τ], ŷ = argmax q̂, log q̃ = sharpen(log q̂, T);
    g = max(m, c) with the confident bypass, else m; ℓ^CE per ``target_mode`` (hybrid: hard label where
    c = 1, sharpened soft target elsewhere); ℓ^D = D(q̃ ‖ σ(ℓ^s)). ``unit_divergence_weight`` forces β = 1.
    """
    log_weak = log_weak.detach()
    if log_weak.dtype in (torch.float16, torch.bfloat16):
        log_weak = log_weak.float()
    entropy = normalized_entropy(log_weak)
    weight = uncertainty_weight(entropy)
    confidence, pseudo_labels = log_weak.exp().max(dim=-1)
    confident = (confidence >= threshold).to(log_weak.dtype)
    mask = entropy_mask.to(log_weak.dtype)
    gate = torch.maximum(mask, confident) if confident_bypass else mask
    ce_weight, div_weight = weights_for(weight_mode, weight, confident)
    if unit_divergence_weight:
        div_weight = torch.ones_like(div_weight)
    log_sharpened = sharpen_log(log_weak, temperature)

    strong = strong_logits if strong_logits.dtype == torch.float64 else strong_logits.float()
    log_strong = F.log_softmax(strong, dim=-1)
    hard = -log_strong.gather(-1, pseudo_labels[..., None])[..., 0]
    soft = -(log_sharpened.exp() * log_strong).sum(dim=-1)
    if target_mode == "hybrid":
        ce = confident * hard + (1.0 - confident) * soft
    elif target_mode == "hard":
        ce = hard
    elif target_mode == "soft":
        ce = soft
    else:
        raise ValueError(f"unknown target_mode {target_mode!r}; use hybrid, hard or soft")

    ce_term = (gate * ce_weight * ce).mean()
    # With λ_B = 0 the divergence is not evaluated at all, so the loss cannot depend on its kind.
    div_term = (gate * div_weight * divergence(log_sharpened, strong, kind)).mean() if lambda_b else ce_term * 0
    return UnlabeledTerms(
        loss=ce_term + lambda_b * div_term, ce=ce_term, div=div_term, entropy=entropy, weight=weight,
        confident=confident, gate=gate, ce_weight=ce_weight, pseudo_labels=pseudo_labels,
    )
