"""Confidence thresholds that turn weak-view predictions into hard pseudo-labels and a mask."""

from __future__ import annotations

import torch
from torch import nn


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
