"""PC-softmax (prior-corrected softmax cross-entropy) and the mutual-information estimates built on it.

Spec: specs/infocam.md §3.1–§3.2. With p the class proportions of the *training split* and π = log p,

    s̃_y(x) = e^{f_y} / Σ_k p_k e^{f_k},      log s̃_y = f_y − LSE(f + π),

so s̃_y estimates p(y|x)/p(y) = exp PMI(x, y): it can exceed 1, Σ_y p_y s̃_y = 1, and
L_PC = −mean log s̃_y can be negative. L_PC = CE(f + π, y) + mean log p_y, hence it has exactly the
gradients of the logit-adjusted loss (temperature 1).

Everything is computed in log space and in float32 at least (half-precision logits are upcast): the
ratio form exp(f)/Σ p exp(f) overflows above f ≈ 88 in fp32, and log(· + 1e-6) biases Î (bug B8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MI_TERM_KEYS",
    "PriorKind",
    "Reduction",
    "TrainedWith",
    "log_pc_scores",
    "mi_from_sums",
    "mi_terms",
    "pc_softmax_loss",
    "prior_from_counts",
]

PriorKind = Literal["empirical", "uniform"]
TrainedWith = Literal["ce", "pc_softmax"]
Reduction = Literal["mean", "sum", "none"]

# Keys of `mi_terms`: per-batch sums, all float64 scalars (see its docstring).
MI_TERM_KEYS: tuple[str, ...] = ("sum_log_pc", "sum_log_softmax", "sum_ba", "count")


def _as_fp32(x: Tensor) -> Tensor:
    # bf16/fp16 logits are upcast; float64 stays float64 so oracle tests can run at full precision.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_shapes(logits: Tensor, log_prior: Tensor, targets: Tensor | None = None) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    if log_prior.shape != (logits.shape[1],):
        raise ValueError(
            f"log_prior must be ({logits.shape[1]},) to match the logits, got {tuple(log_prior.shape)}"
        )
    if targets is not None and targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")


def log_pc_scores(logits: Tensor, log_prior: Tensor) -> Tensor:
    """Log PC-softmax scores of every class.

        log s̃_k(x) = f_k(x) − LSE_j(f_j(x) + π_j)

    Args:
        logits: (B, K) logits f; bf16/fp16 are upcast to fp32.
        log_prior: (K,) log class proportions π of the training split (a constant, no gradient needed).

    Returns:
        (B, K) log s̃ in fp32 (fp64 for fp64 logits). Invariant to adding a per-row constant to f.
    """
    _check_shapes(logits, log_prior)
    f = _as_fp32(logits)
    pi = log_prior.to(device=f.device, dtype=f.dtype)
    return f - torch.logsumexp(f + pi, dim=1, keepdim=True)


def pc_softmax_loss(
    logits: Tensor, targets: Tensor, log_prior: Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """PC-softmax loss  L_PC = −(1/B) Σ_i log s̃_{y_i}(x_i)  (may be negative).

    Its gradient is ∂L/∂f_k = (1/B)(σ_k(f + π) − 1[k = y]), that of CE on the logits f + π.

    Args:
        logits: (B, K) logits; bf16/fp16 are upcast, the loss is fp32.
        targets: (B,) integer labels.
        log_prior: (K,) log training-split proportions π.
        reduction: "mean" (over the B samples), "sum", or "none" for the (B,) per-sample losses.
    """
    _check_shapes(logits, log_prior, targets)
    per_sample = -log_pc_scores(logits, log_prior).gather(1, targets.long()[:, None]).squeeze(1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")


def prior_from_counts(counts: Tensor | Sequence[int], kind: PriorKind = "empirical") -> Tensor:
    """Log class prior π from the training split's per-class counts.

    `empirical` gives π_k = log(n_k / Σ_j n_j); `uniform` gives π_k = −log K (PC-softmax then equals
    CE − log K). Computed in float64, returned as float32 (K,).

    Raises:
        ValueError: a class has no training sample (p_k = 0 would make π_k = −inf and the PC score of
            that class undefined: a configuration error, spec §8 test 7), a count is negative, or the
            kind is unknown.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if kind not in get_args(PriorKind):
        raise ValueError(f"prior kind must be one of {get_args(PriorKind)}, got {kind!r}")
    if n.numel() == 0:
        raise ValueError("counts is empty")
    if (n < 0).any():
        raise ValueError(f"class counts must be non-negative, got {n.tolist()}")
    empty = (n == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty} have no training sample (p_k = 0): the PC-softmax prior is undefined. "
            "Derive the prior from the full training split and check the label protocol."
        )
    if kind == "uniform":
        return torch.full((n.numel(),), -math.log(n.numel()), dtype=torch.float32)
    return (n / n.sum()).log().float()


def mi_terms(
    logits: Tensor, targets: Tensor, log_prior: Tensor, trained_with: TrainedWith
) -> dict[str, Tensor]:
    """Per-batch sums for the three MI estimates of spec §3.2 (accumulate them over the split).

    Returns float64 scalar tensors (no gradient):
        sum_log_pc:      Σ_i log s̃_{y_i}(x_i)                     → Î_PC  = sum_log_pc / N
        sum_log_softmax: Σ_i log σ_{y_i}(f(x_i))                  → Î_bal = log K + sum_log_softmax / N
        sum_ba:          Σ_i [log q(y_i|x_i) − π_{y_i}]            → Î_BA  = sum_ba / N
        count:           B
    where q = σ(f) for `trained_with="ce"` and q = σ(f + π) for `"pc_softmax"` (then the BA term is
    log s̃_y itself, so Î_BA ≡ Î_PC exactly). `mi_from_sums` turns accumulated sums into nats.
    """
    if trained_with not in get_args(TrainedWith):
        raise ValueError(f"trained_with must be one of {get_args(TrainedWith)}, got {trained_with!r}")
    _check_shapes(logits, log_prior, targets)
    with torch.no_grad():
        f = _as_fp32(logits.detach())
        pi = log_prior.to(device=f.device, dtype=f.dtype)
        y = targets.long()[:, None]
        log_pc = (f - torch.logsumexp(f + pi, dim=1, keepdim=True)).gather(1, y).squeeze(1)
        log_softmax = F.log_softmax(f, dim=1).gather(1, y).squeeze(1)
        ba = log_pc if trained_with == "pc_softmax" else log_softmax - pi[targets.long()]
        return {
            "sum_log_pc": log_pc.double().sum(),
            "sum_log_softmax": log_softmax.double().sum(),
            "sum_ba": ba.double().sum(),
            "count": torch.tensor(float(f.shape[0]), dtype=torch.float64, device=f.device),
        }


def mi_from_sums(
    sum_log_pc: Tensor | float,
    sum_log_softmax: Tensor | float,
    sum_ba: Tensor | float,
    count: Tensor | float,
    num_classes: int,
) -> dict[str, float]:
    """Î_PC, Î_bal and Î_BA in nats from sums accumulated over a whole split (keys mi_pc, mi_bal, mi_ba)."""
    n = float(count)
    if n <= 0:
        raise ValueError("no samples were accumulated")
    return {
        "mi_pc": float(sum_log_pc) / n,
        "mi_bal": math.log(num_classes) + float(sum_log_softmax) / n,
        "mi_ba": float(sum_ba) / n,
    }
