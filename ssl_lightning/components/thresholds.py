"""Confidence thresholds that turn weak-view predictions into hard pseudo-labels and a mask."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.components.collectives import all_reduce_sum


class FixedThreshold(nn.Module):
    """FixMatch's rule: accept the arg-max class where the max probability reaches ``threshold``."""

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs`` (N, C) in float32 → (pseudo_labels (N,), pseudo_label_mask (N,) as float)."""
        confidence, pseudo_labels = probs.max(dim=1)
        return pseudo_labels, (confidence >= self.threshold).float()


class SelfAdaptiveThreshold(nn.Module):
    """FreeMatch's self-adaptive threshold (SAT), with a fixed-threshold mode that still tracks the state.

    State (fp32 persistent buffers, so they are checkpointed): the global confidence EMA ``τ`` (scalar)
    and the class-marginal EMA ``p̃`` (C-vector), both initialised to 1/C. One call on a batch of
    probabilities q_i, with c_i = max_k q_ik and ŷ_i = argmax_k q_ik, first updates the state

        τ_t  = m·τ_{t−1}  + (1−m) · (1/N) Σ_i c_i
        p̃_t = m·p̃_{t−1} + (1−m) · (1/N) Σ_i q_i

    and then thresholds with the *updated* state, so the current batch counts:

        mode "sat":   mask_i = 1[c_i ≥ τ_t(ŷ_i)],  τ_t(k) = τ_t · p̃_t(k) / max_k′ p̃_t(k′)
        mode "fixed": mask_i = 1[c_i ≥ fixed_value]  (the state is updated for logging only)

    When ``torch.distributed`` is initialised and ``sync`` is true, the means over i run over the global
    batch of all ranks, so the state is identical on every rank and equal to a single-process run on the
    concatenated batch.

    Args:
        num_classes: C.
        momentum: EMA momentum m.
        mode: ``"sat"`` or ``"fixed"``.
        fixed_value: the threshold of ``"fixed"`` mode.
        sync: average the batch statistics over all ranks.
    """

    global_threshold: torch.Tensor
    class_marginal: torch.Tensor

    MODES = ("sat", "fixed")

    def __init__(
        self,
        num_classes: int,
        momentum: float = 0.999,
        mode: str = "sat",
        fixed_value: float = 0.95,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 <= fixed_value <= 1.0:
            raise ValueError(f"fixed_value must be in [0, 1], got {fixed_value}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.mode = mode
        self.fixed_value = fixed_value
        self.sync = sync
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes, dtype=torch.float32))
        self.register_buffer(
            "class_marginal", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32)
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, momentum={self.momentum}, mode={self.mode!r}, "
            f"fixed_value={self.fixed_value}, sync={self.sync}"
        )

    def _check_state_dtype(self) -> None:
        # In bf16 the momentum 0.999 rounds to 1.0 and the state freezes; in fp16 the (1−m)·x increments
        # vanish near τ ≈ 0.9. Lightning's "*-true" precisions cast every floating buffer, so fail loudly.
        for name in ("global_threshold", "class_marginal"):
            dtype = getattr(self, name).dtype
            if dtype != torch.float32:
                raise TypeError(
                    f"SelfAdaptiveThreshold.{name} is {dtype}, expected torch.float32: the EMA state must "
                    "stay fp32. Use a '*-mixed' precision (e.g. 'bf16-mixed') instead of a '*-true' one, "
                    "or cast this module back with .float()."
                )

    def _batch_means(
        self, probs: torch.Tensor, confidence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1/N) Σ_i c_i, (1/N) Σ_i q_i and N, over the global batch when synchronised."""
        count = torch.full((1,), probs.shape[0], dtype=torch.float32, device=probs.device)
        packed = torch.cat([confidence.sum().reshape(1), probs.sum(dim=0), count])
        if self.sync:
            # One packed collective instead of three: sums are additive, the division happens after.
            all_reduce_sum(packed)
        count = packed[-1]
        # clamp: a globally empty batch leaves the state untouched (see forward) instead of dividing by 0.
        denominator = count.clamp_min(1.0)
        return packed[0] / denominator, packed[1:-1] / denominator, count

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Advance τ and p̃ by one EMA step on ``probs`` (N, C); see the class docstring."""
        self._check_state_dtype()
        with torch.autocast(device_type=probs.device.type, enabled=False):
            probs = probs.detach().float()
            mean_confidence, mean_probs, count = self._batch_means(probs, probs.amax(dim=1))
            m = self.momentum
            has_samples = count > 0
            self.global_threshold.copy_(
                torch.where(
                    has_samples,
                    m * self.global_threshold + (1.0 - m) * mean_confidence,
                    self.global_threshold,
                )
            )
            self.class_marginal.copy_(
                torch.where(
                    has_samples, m * self.class_marginal + (1.0 - m) * mean_probs, self.class_marginal
                )
            )

    @torch.no_grad()
    def class_thresholds(self) -> torch.Tensor:
        """τ(k) = τ · p̃(k) / max_k′ p̃(k′), shape (C,); what ``"sat"`` mode compares against."""
        return self.global_threshold * self.class_marginal / self.class_marginal.max()

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs`` (N, C) → (pseudo_labels (N,) long, mask (N,) float32); updates the state first."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must have shape (N, {self.num_classes}), got {tuple(probs.shape)}")
        self.update(probs)
        with torch.autocast(device_type=probs.device.type, enabled=False):
            # Compare in fp32: bf16 resolves only 1/256 near 1, which would make c ≥ 0.95 coarse.
            confidence, pseudo_labels = probs.detach().float().max(dim=1)
            if self.mode == "sat":
                threshold = self.class_thresholds()[pseudo_labels]
            else:
                threshold = torch.full_like(confidence, self.fixed_value)
            return pseudo_labels, (confidence >= threshold).float()
