"""The dynamic entropy gate of uwbssl: EMA statistics of normalised weak-view entropies (specs/bhattacharyya.md §3.3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ssl_lightning.components.collectives import all_reduce_sum


class EntropyMask(nn.Module):
    """m_i = 1[e_i ≤ ε_t], ε_t = μ_t + k_t σ_t, all in normalised-entropy units (e = H / log C).

    State (fp32 persistent buffers, checkpointed): ``mean`` μ_t, ``spread`` (σ_t under ``ema_std``, the
    variance v_t under ``ema_var``) and ``initialised``. One update per optimiser step, with the current
    batch, **before** masking (FreeMatch/SoftMatch convention):

        ē_t = mean_i e_i,  s_t = unbiased std of e over the global batch (0 if n < 2)
        μ_t = m μ_{t−1} + (1 − m) ē_t;   σ_t = m σ_{t−1} + (1 − m) s_t   (ema_var: v on s², σ = √v)

    ``init=first_batch`` sets μ, σ to the first batch's statistics; ``prior`` starts from μ = 1, σ = 0.
    The moments (n, Σe, Σe²) are all-reduced in float64, so every rank holds the same state, equal to a
    single process on the global batch.

    The threshold multiplier rises linearly, k_t = k₀ + (k₁ − k₀)·min(1, t / (r_k K)) (``linear``) or
    stays k₀ (``constant``), so the gate relaxes over training; ε is clamped to [ε_min, ε_max] for
    t < r_c K (``early``), always, or never.
    """

    mean: torch.Tensor
    spread: torch.Tensor
    initialised: torch.Tensor

    def __init__(
        self,
        momentum: float = 0.999,
        sigma_mode: Literal["ema_std", "ema_var"] = "ema_std",
        init: Literal["first_batch", "prior"] = "first_batch",
        k_start: float = 1.0,
        k_end: float = 2.0,
        k_ramp: float = 1.0,
        k_schedule: Literal["linear", "constant"] = "linear",
        clamp_mode: Literal["early", "always", "never"] = "early",
        eps_min: float = 0.2,
        eps_max: float = 0.8,
        clamp_ratio: float = 0.05,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if sigma_mode not in ("ema_std", "ema_var") or init not in ("first_batch", "prior"):
            raise ValueError(f"unknown sigma_mode {sigma_mode!r} or init {init!r}")
        if k_schedule not in ("linear", "constant") or clamp_mode not in ("early", "always", "never"):
            raise ValueError(f"unknown k_schedule {k_schedule!r} or clamp_mode {clamp_mode!r}")
        if not 0.0 <= eps_min <= eps_max <= 1.0:
            raise ValueError(f"need 0 <= eps_min <= eps_max <= 1, got {eps_min}, {eps_max}")
        self.momentum = momentum
        self.sigma_mode = sigma_mode
        self.init = init
        self.k_start, self.k_end, self.k_ramp, self.k_schedule = k_start, k_end, k_ramp, k_schedule
        self.clamp_mode, self.eps_min, self.eps_max, self.clamp_ratio = clamp_mode, eps_min, eps_max, clamp_ratio
        self.sync = sync
        prior_mean = 1.0 if init == "prior" else 0.0
        self.register_buffer("mean", torch.tensor(prior_mean, dtype=torch.float32))
        self.register_buffer("spread", torch.tensor(0.0, dtype=torch.float32))
        self.register_buffer("initialised", torch.tensor(init == "prior"))

    @property
    def sigma(self) -> torch.Tensor:
        return self.spread.sqrt() if self.sigma_mode == "ema_var" else self.spread

    def k(self, step: int, total_steps: int) -> float:
        if self.k_schedule == "constant":
            return self.k_start
        progress = min(1.0, step / max(1.0, self.k_ramp * total_steps))
        return self.k_start + (self.k_end - self.k_start) * progress

    def threshold(self, step: int, total_steps: int) -> torch.Tensor:
        """ε_t = μ_t + k_t σ_t, clamped to [ε_min, ε_max] while the clamp is active."""
        epsilon = self.mean + self.k(step, total_steps) * self.sigma
        clamped = self.clamp_mode == "always" or (self.clamp_mode == "early" and step < self.clamp_ratio * total_steps)
        return epsilon.clamp(self.eps_min, self.eps_max) if clamped else epsilon

    @torch.no_grad()
    def update(self, entropy: torch.Tensor) -> None:
        """One EMA step on the normalised entropies ``entropy`` (N,) of this rank's unlabeled batch."""
        e = entropy.detach().double()
        moments = torch.stack([e.new_tensor(float(e.numel())), e.sum(), (e * e).sum()])
        if self.sync:
            all_reduce_sum(moments)
        n, total, squares = moments
        batch_mean = total / n.clamp_min(1.0)
        # Unbiased variance from the moments; clamped at 0 against rounding.
        variance = ((squares - n * batch_mean**2) / (n - 1).clamp_min(1.0)).clamp_min(0.0)
        variance = torch.where(n >= 2, variance, torch.zeros_like(variance))
        batch_spread = variance if self.sigma_mode == "ema_var" else variance.sqrt()
        m = self.momentum
        new_mean = torch.where(self.initialised, m * self.mean.double() + (1 - m) * batch_mean, batch_mean)
        new_spread = torch.where(self.initialised, m * self.spread.double() + (1 - m) * batch_spread, batch_spread)
        self.mean.copy_(new_mean.float())
        self.spread.copy_(new_spread.float())
        self.initialised.fill_(True)

    def forward(self, entropy: torch.Tensor, step: int, total_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Update with the batch, then return (mask (N,) float, ε_t)."""
        self.update(entropy)
        epsilon = self.threshold(step, total_steps)
        return (entropy.float() <= epsilon).float(), epsilon
