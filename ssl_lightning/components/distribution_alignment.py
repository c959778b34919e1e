"""Distribution alignment over a sliding window of batch-mean predictions (SimMatch, ReMixMatch-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.components.collectives import all_reduce_sum


class DistributionAlignment(nn.Module):
    """p̃_b = norm₁(p_b ⊘ p̄) with p̄ the mean of the last ``window`` global batch means (target: uniform).

    State (persistent buffers, fp32/int64, checkpointed): the FIFO ``rows`` Q (N×C), the write pointer
    ``pointer`` and the number of filled rows ``filled`` n ≤ N, and ``nonfinite_skips``. A step pushes
    the mean of the *raw* probabilities over the global batch (all ranks, one all-reduce of the sum and
    the count) **before** aligning, so the current batch counts. p̄ is the mean over the filled rows,
    not over a zero-padded buffer; the two differ by the scalar n/N, which cancels in norm₁. The
    window forgets completely: it is not an EMA.

    A non-finite batch mean is never written (it would poison every later step and every checkpoint);
    it is counted in ``nonfinite_skips`` instead.
    """

    rows: torch.Tensor
    pointer: torch.Tensor
    filled: torch.Tensor
    nonfinite_skips: torch.Tensor

    def __init__(self, num_classes: int, window: int = 32, sync: bool = True) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"the distribution-alignment window must hold at least 1 row, got {window}")
        self.num_classes = num_classes
        self.window = window
        self.sync = sync
        self.register_buffer("rows", torch.zeros(window, num_classes, dtype=torch.float32))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, window={self.window}, sync={self.sync}"

    @torch.no_grad()
    def push(self, probs: torch.Tensor) -> None:
        """Write the global-batch mean of ``probs`` (N, C) into the window."""
        probs = probs.detach().float()
        packed = torch.cat([probs.sum(dim=0), probs.new_full((1,), probs.shape[0])])
        if self.sync:
            all_reduce_sum(packed)
        count = packed[-1]
        mean = packed[:-1] / count.clamp_min(1.0)
        finite = torch.isfinite(mean).all()
        # Tensor conditions, not Python branches: no host sync per step. An empty global batch writes
        # nothing; a non-finite mean writes nothing and is counted.
        write = (count > 0) & finite
        self.nonfinite_skips += ((count > 0) & ~finite).long()
        self.rows[self.pointer] = torch.where(write, mean, self.rows[self.pointer])
        self.pointer.copy_(torch.where(write, (self.pointer + 1) % self.window, self.pointer))
        self.filled.copy_(torch.where(write, torch.clamp(self.filled + 1, max=self.window), self.filled))

    def mean(self) -> torch.Tensor:
        """p̄: the mean over the filled rows (uniform before the first push).

        Unfilled rows are zero, so the sum over all rows divided by n is that mean, computed without
        reading n on the host (a device sync every step on GPUs)."""
        uniform = self.rows.new_full((self.num_classes,), 1.0 / self.num_classes)
        return torch.where(self.filled > 0, self.rows.sum(dim=0) / self.filled.clamp_min(1), uniform)

    def log_align(self, logits: torch.Tensor) -> torch.Tensor:
        """log p̃ = log_softmax(ℓ − log max(p̄, 1e-12)): the stable form of norm₁(σ(ℓ) ⊘ p̄)."""
        return F.log_softmax(logits.detach().float() - self.mean().clamp_min(1e-12).log(), dim=-1)


class EMADistributionAlignment(nn.Module):
    """ReMixMatch's alignment with an EMA of the global-batch mean prediction (uwbssl, USB's ``DistAlign``):

        q̂_b = normalise(q_b ⊙ (π + δ) / (p̄_t + δ)),   p̄_t = m·p̄_{t−1} + (1 − m)·mean_b q_b (global batch)

    evaluated as log_softmax(log q + log(π + δ) − log(p̄ + δ)). p̄ is initialised with the first global
    batch mean (``initialised`` flag, a tensor so no host sync is needed) and always updated from the
    pre-alignment probabilities. π, the target, is uniform or a given histogram (e.g. the labeled one).
    """

    mean_prediction: torch.Tensor
    target: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, num_classes: int, momentum: float = 0.999, target: torch.Tensor | None = None,
                 delta: float = 1e-6, sync: bool = True) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.delta = delta
        self.sync = sync
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("mean_prediction", uniform.clone())
        self.register_buffer("target", uniform.clone() if target is None else target.float() / target.sum())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}, delta={self.delta}, sync={self.sync}"

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        probs = probs.detach().float()
        packed = torch.cat([probs.sum(dim=0), probs.new_full((1,), probs.shape[0])])
        if self.sync:
            all_reduce_sum(packed)
        batch_mean = packed[:-1] / packed[-1].clamp_min(1.0)
        blended = self.momentum * self.mean_prediction + (1.0 - self.momentum) * batch_mean
        self.mean_prediction.copy_(torch.where(self.initialised, blended, batch_mean))
        self.initialised.fill_(True)

    def log_align(self, log_probs: torch.Tensor) -> torch.Tensor:
        """log q̂ from log q (rows renormalised)."""
        shift = (self.target + self.delta).log() - (self.mean_prediction + self.delta).log()
        return F.log_softmax(log_probs.float() + shift, dim=-1)
