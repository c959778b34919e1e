"""InfoMatch (Han et al., IJCAI 2024): entropy neural estimation for semi-supervised classification.

The objective is the authors' code's (``specs/infomatch.md`` §3): hard pseudo-labels from the weak
view, gated by FreeMatch's self-adaptive thresholds, train two strong views and a CutMix of weak views;
a view-agreement term aligns the two strong views.

    L = L_s + λ_u · (w_cm·L_cm + w_s1·L_st1 + w_s2·L_st2 + w_mi·L_mi)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ssl_lightning.components.cutmix import cutmix, sample_cutmix_boxes
from ssl_lightning.components.thresholds import SelfAdaptiveThreshold
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses import cutmix_cross_entropy, info_nce, masked_cross_entropy, zscore_mse
from ssl_lightning.methods.base import Method, cross_entropy
from ssl_lightning.nets.heads import ProjectionHead


@dataclass
class ThresholdConfig:
    """Pseudo-label gate: ``sat`` (self-adaptive, FreeMatch) or ``fixed`` at ``value``.

    In ``fixed`` mode the SAT statistics are still tracked, for logging only. ``sync`` all-reduces
    them over ranks so they describe the global batch.
    """

    mode: Literal["sat", "fixed"] = "sat"
    momentum: float = 0.999
    value: float = 0.95
    sync: bool = True


@dataclass
class InfoNCEConfig:
    """The contrastive estimator option: temperature τ_c, projection size, and its input."""

    temperature: float = 0.2
    proj_dim: int = 64
    input: Literal["features", "logits"] = "features"


class InfoMatch(Method):
    """InfoMatch.

    Args:
        lambda_u: weight λ_u of the unlabeled terms.
        w_cutmix: weight w_cm of the CutMix-of-weak-views term.
        w_strong: weights (w_s1, w_s2) of the two strong-view terms.
        w_mi: weight of the view-agreement term.
        mi_estimator: ``zmse`` (the reference: MSE between z-scored strong-view logits) or ``infonce``.
        zmse_eps: ε guarding the z-score denominator.
        infonce: settings of the InfoNCE option.
        threshold: the pseudo-label gate.
        sup_warmup_steps: first steps trained on the labeled loss alone (SVHN protocol).
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method`.
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    # Both strong views are built on top of the weak one, sharing its crop and flip (reference code).
    unlabeled_views: ClassVar[list[str]] = ["weak", "strong@weak", "strong@weak"]

    def __init__(
        self,
        lambda_u: float = 2.0,
        w_cutmix: float = 0.5,
        w_strong: tuple[float, float] = (0.25, 0.25),
        w_mi: float = 0.001,
        mi_estimator: Literal["zmse", "infonce"] = "zmse",
        zmse_eps: float = 1e-6,
        infonce: InfoNCEConfig | None = None,
        threshold: ThresholdConfig | None = None,
        sup_warmup_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.lambda_u = lambda_u
        self.w_cutmix = w_cutmix
        self.w_strong = tuple(w_strong)
        self.w_mi = w_mi
        self.mi_estimator = mi_estimator
        self.zmse_eps = zmse_eps
        self.infonce = infonce or InfoNCEConfig()
        threshold = threshold or ThresholdConfig()
        self.sup_warmup_steps = sup_warmup_steps
        self.pseudo_labeler = SelfAdaptiveThreshold(
            self.num_classes, momentum=threshold.momentum, mode=threshold.mode, fixed_value=threshold.value,
            sync=threshold.sync,
        )
        # The head exists only with the InfoNCE option on features, so no parameter is ever unused.
        self.projection: ProjectionHead | None = None
        if mi_estimator == "infonce" and self.infonce.input == "features":
            width = self.backbone.num_features
            self.projection = ProjectionHead(width, width, self.infonce.proj_dim, num_layers=2, batch_norm=False)

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled = batch["labeled"]
        if self.global_step < self.sup_warmup_steps:
            # Supervised warm-up: the labeled batch alone, no unlabeled forward, SAT untouched.
            supervised_loss = cross_entropy(self(labeled.views[0]), labeled.targets)
            return {"loss": supervised_loss, "supervised_loss": supervised_loss}

        unlabeled = batch["unlabeled"]
        weak, strong_1, strong_2 = unlabeled.views
        n = weak.shape[0]
        # CutMix over the global batch: boxes and the partner permutation are drawn alike on every
        # rank and each rank mixes its slice, so partners come from all N images whatever the GPU
        # count (the reference draws within each rank's batch, which makes results depend on it).
        local = slice(self.global_rank * n, (self.global_rank + 1) * n)
        generator = self.step_generator()
        box_mask, lam = sample_cutmix_boxes(n * self.world_size, weak.shape[-2], weak.shape[-1],
                                            generator=generator, device=weak.device)
        permutation = torch.randperm(n * self.world_size, generator=generator, device=weak.device)
        mixed_weak = cutmix(self.gather_global(weak), box_mask, permutation)[local]

        # One forward pass over every view, so BatchNorm statistics cover them all.
        images = torch.cat([labeled.views[0], weak, mixed_weak, strong_1, strong_2])
        logits, features = self.backbone.forward_with_features(self._memory_format(images))
        sizes = [labeled.views[0].shape[0], n, n, n, n]
        logits_l, logits_weak, logits_mixed, logits_s1, logits_s2 = logits.split(sizes)

        supervised_loss = cross_entropy(logits_l, labeled.targets)
        weak_probs = logits_weak.detach().float().softmax(dim=1)
        pseudo_labels, pseudo_label_mask = self.pseudo_labeler(weak_probs)

        strong_1_loss = masked_cross_entropy(logits_s1, pseudo_labels, pseudo_label_mask)
        strong_2_loss = masked_cross_entropy(logits_s2, pseudo_labels, pseudo_label_mask)
        partners = permutation[local]
        cutmix_loss = cutmix_cross_entropy(
            logits_mixed, pseudo_labels, pseudo_label_mask, lam[local],
            self.gather_global(pseudo_labels)[partners], self.gather_global(pseudo_label_mask)[partners],
        )
        if self.mi_estimator == "zmse":
            view_agreement = zscore_mse(logits_s1, logits_s2, eps=self.zmse_eps)
        else:
            _, _, _, features_s1, features_s2 = features.split(sizes)
            view_agreement = self._info_nce(logits_s1, logits_s2, features_s1, features_s2)

        unlabeled_loss = (
            self.w_cutmix * cutmix_loss
            + self.w_strong[0] * strong_1_loss
            + self.w_strong[1] * strong_2_loss
            + self.w_mi * view_agreement
        )
        self.log_pseudo_labels(pseudo_labels, pseudo_label_mask, unlabeled.targets)
        self.log_train(
            {
                "train/sat_global_threshold": self.pseudo_labeler.global_threshold,
                "train/sat_min_class_threshold": self.pseudo_labeler.class_thresholds().min(),
            },
            batch_size=n,
        )
        return {
            "loss": supervised_loss + self.lambda_u * unlabeled_loss,
            "supervised_loss": supervised_loss,
            "strong_1_loss": strong_1_loss,
            "strong_2_loss": strong_2_loss,
            "cutmix_loss": cutmix_loss,
            "view_agreement_loss": view_agreement,
        }

    def _info_nce(self, logits_s1: torch.Tensor, logits_s2: torch.Tensor, features_s1: torch.Tensor,
                  features_s2: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            z_1, z_2 = self.projection(features_s1), self.projection(features_s2)
        else:
            z_1, z_2 = logits_s1, logits_s2
        if self.world_size == 1:
            return info_nce(z_1, z_2, self.infonce.temperature)
        # Candidates are the global batch; gradients flow back through the gather to every rank.
        z_1_all = self.all_gather(z_1, sync_grads=True).flatten(0, 1)
        z_2_all = self.all_gather(z_2, sync_grads=True).flatten(0, 1)
        offset = self.global_rank * z_1.shape[0]
        return info_nce(z_1, z_2, self.infonce.temperature, z_a_all=z_1_all, z_b_all=z_2_all, offset=offset)
