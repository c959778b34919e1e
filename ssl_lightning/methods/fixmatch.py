"""FixMatch (Sohn et al., 2020): hard pseudo-labels from the weak view train the strong view."""

from __future__ import annotations

from typing import ClassVar

import torch

from ssl_lightning.components.thresholds import FixedThreshold
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods.base import Method, cross_entropy


class FixMatch(Method):
    """L = L_s + λ_u · L_u with

    L_s = 1/B  Σ_b CE(p(y | weak(x_b)), y_b)
    L_u = 1/μB Σ_b 1[max q_b ≥ τ] · CE(p(y | strong(u_b)), argmax q_b),   q_b = p(y | weak(u_b)) (no gradient)

    The unlabeled mean runs over all μB samples, accepted or not.

    Args:
        lambda_u: weight λ_u of the unlabeled term.
        threshold: confidence threshold τ.
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method`.
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = ["weak", "strong"]

    def __init__(self, lambda_u: float = 1.0, threshold: float = 0.95, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lambda_u = lambda_u
        self.pseudo_labeler = FixedThreshold(threshold)

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        weak_u, strong_u = unlabeled.views
        logits_l, logits_weak, logits_strong = self.forward_views([labeled.views[0], weak_u, strong_u])

        supervised_loss = cross_entropy(logits_l, labeled.targets)
        weak_probs = logits_weak.detach().float().softmax(dim=1)
        pseudo_labels, pseudo_label_mask = self.pseudo_labeler(weak_probs)
        unlabeled_loss = (cross_entropy(logits_strong, pseudo_labels, reduction="none") * pseudo_label_mask).mean()

        self.log_pseudo_labels(pseudo_labels, pseudo_label_mask, unlabeled.targets)
        return {
            "loss": supervised_loss + self.lambda_u * unlabeled_loss,
            "supervised_loss": supervised_loss,
            "unlabeled_loss": unlabeled_loss,
        }
