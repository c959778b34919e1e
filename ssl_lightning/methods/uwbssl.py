"""uwbssl (Ghazal et al., Sci. Rep. 2025): uncertainty-weighted SSL with a dynamic entropy mask and a
Bhattacharyya-regularised consistency loss (``specs/bhattacharyya.md``).

    L   = λ_s L_s + λ_u L_u
    L_u = 1/μB Σ_i g_i [ω_i ℓ^CE_i + λ_B β_i D(q̃_i ‖ p^s_i)]

with e_i the normalised entropy of the (optionally aligned) weak prediction q̂_i, w_i = 4e_i(1 − e_i)
the bell weight that favours moderately uncertain samples, m_i = 1[e_i ≤ ε_t] the EMA-adaptive entropy
gate, c_i = 1[max q̂_i ≥ τ], g_i = max(m_i, c_i), q̃_i = Sharpen(q̂_i; T). The default weighting is
``max_conf`` (ω = max(w, c), β = w); ``literal`` is the paper's literal reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.components.distribution_alignment import EMADistributionAlignment
from ssl_lightning.components.entropy_mask import EntropyMask
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.divergences import Divergence, normalized_entropy
from ssl_lightning.losses.uncertainty import TargetMode, UnlabeledTerms, WeightMode, uwbssl_unlabeled_loss
from ssl_lightning.methods.base import Method, cross_entropy


@dataclass
class EntropyMaskConfig:
    """The dynamic entropy gate (§3.3); ``enabled=false`` gives m ≡ 1 (the paper's "− dynamic masking")."""

    enabled: bool = True
    momentum: float = 0.999
    sigma_mode: Literal["ema_std", "ema_var"] = "ema_std"
    init: Literal["first_batch", "prior"] = "first_batch"
    k_start: float = 1.0
    k_end: float = 2.0
    k_ramp: float = 1.0
    k_schedule: Literal["linear", "constant"] = "linear"
    clamp_mode: Literal["early", "always", "never"] = "early"
    eps_min: float = 0.2
    eps_max: float = 0.8
    clamp_ratio: float = 0.05


@dataclass
class AlignmentConfig:
    """Distribution alignment of the weak prediction before masking (the imbalance protocols)."""

    enabled: bool = False
    momentum: float = 0.999
    target: Literal["uniform", "labeled"] = "uniform"


class UWBSSL(Method):
    """uwbssl.

    Args:
        threshold: τ, the confidence that makes a sample "confident" (hard label, full weight, never deferred).
        temperature: T of the sharpened soft target.
        lambda_s, lambda_u: weights of the supervised and unlabeled terms.
        lambda_b: weight λ_B of the divergence term (0: none).
        divergence: ``bhattacharyya`` (default), ``kl``, ``js``, ``hellinger`` (squared) or ``tv``.
        weight_mode: ``max_conf`` (default), ``literal``, ``none`` or ``conf_only`` (the FixMatch preset).
        target_mode: ``hybrid`` (default), ``hard`` or ``soft``.
        confident_bypass: g = max(m, c) instead of g = m.
        unit_divergence_weight: β ≡ 1.
        mask: the entropy gate; da: distribution alignment.
        weak_forward: ``split`` (the weak view under no_grad in its own forward; exact for LayerNorm nets),
            ``concat`` (one forward over all views; needed with BatchNorm) or ``auto`` (split unless the
            backbone has BatchNorm).
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method`.
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = ["weak", "strong"]

    def __init__(
        self,
        threshold: float = 0.95,
        temperature: float = 0.5,
        lambda_s: float = 1.0,
        lambda_u: float = 1.0,
        lambda_b: float = 1.0,
        divergence: Divergence = "bhattacharyya",
        weight_mode: WeightMode = "max_conf",
        target_mode: TargetMode = "hybrid",
        confident_bypass: bool = True,
        unit_divergence_weight: bool = False,
        mask: EntropyMaskConfig | None = None,
        da: AlignmentConfig | None = None,
        weak_forward: Literal["auto", "split", "concat"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.threshold = threshold
        self.temperature = temperature
        self.lambda_s, self.lambda_u, self.lambda_b = lambda_s, lambda_u, lambda_b
        self.divergence = divergence
        self.weight_mode = weight_mode
        self.target_mode = target_mode
        self.confident_bypass = confident_bypass
        self.unit_divergence_weight = unit_divergence_weight
        self.mask_config = mask or EntropyMaskConfig()
        self.da_config = da or AlignmentConfig()
        has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules())
        self.split_forward = weak_forward == "split" or (weak_forward == "auto" and not has_batch_norm)
        if weak_forward == "split" and has_batch_norm:
            raise ValueError("weak_forward='split' changes BatchNorm statistics; use 'concat' with this backbone")
        m = self.mask_config
        self.entropy_mask = EntropyMask(
            m.momentum, m.sigma_mode, m.init, m.k_start, m.k_end, m.k_ramp, m.k_schedule, m.clamp_mode,
            m.eps_min, m.eps_max, m.clamp_ratio,
        )
        self.alignment = (EMADistributionAlignment(self.num_classes, self.da_config.momentum)
                          if self.da_config.enabled else None)
        if lambda_u == 0:
            # The labeled-only floor: no unlabeled stream is loaded and no state is updated.
            self.unlabeled_views = []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if (stage == "fit" and self.alignment is not None and self.da_config.target == "labeled"
                and hasattr(datamodule, "labeled_subset")):
            _, labels = datamodule.labeled_subset()
            histogram = torch.bincount(torch.as_tensor(labels), minlength=self.num_classes).float()
            self.alignment.target.copy_(histogram / histogram.sum())

    @property
    def total_steps(self) -> int:
        total = self.schedule_steps or (self.trainer.max_steps if self._trainer is not None else None)
        if not total or total <= 0:
            raise ValueError("uwbssl's gate schedule needs --model.schedule_steps or --trainer.max_steps > 0")
        return total

    def _logits(self, labeled: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.split_forward:
            # The weak view needs no backward: forwarding it alone under no_grad saves about a third of
            # the FLOPs and is exact for LayerNorm networks (train mode kept: drop-path as USB).
            with torch.no_grad():
                logits_weak = self(weak)
            logits_l, logits_strong = self.forward_views([labeled, strong])
            return logits_l, logits_weak, logits_strong
        logits_l, logits_weak, logits_strong = self.forward_views([labeled, weak, strong])
        return logits_l, logits_weak.detach(), logits_strong

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled = batch["labeled"]
        if self.lambda_u == 0:
            supervised_loss = cross_entropy(self(labeled.views[0]), labeled.targets)
            return {"loss": self.lambda_s * supervised_loss, "supervised_loss": supervised_loss}
        unlabeled = batch["unlabeled"]
        weak, strong = unlabeled.views
        logits_l, logits_weak, logits_strong = self._logits(labeled.views[0], weak, strong)
        supervised_loss = cross_entropy(logits_l, labeled.targets)

        log_weak = F.log_softmax(logits_weak.float(), dim=-1)
        if self.alignment is not None:
            self.alignment.update(log_weak.exp())
            log_weak = self.alignment.log_align(log_weak)
        entropy = normalized_entropy(log_weak)
        if self.mask_config.enabled:
            entropy_mask, epsilon = self.entropy_mask(entropy, self.global_step, self.total_steps)
        else:
            self.entropy_mask.update(entropy)  # tracked for the logs only
            entropy_mask, epsilon = torch.ones_like(entropy), self.entropy_mask.threshold(
                self.global_step, self.total_steps)
        terms = uwbssl_unlabeled_loss(
            log_weak, logits_strong, entropy_mask, self.threshold, self.temperature, self.lambda_b,
            self.divergence, self.weight_mode, self.target_mode, self.confident_bypass,
            self.unit_divergence_weight,
        )
        self._log_diagnostics(terms, entropy_mask, epsilon, unlabeled.targets)
        return {
            "loss": self.lambda_s * supervised_loss + self.lambda_u * terms.loss,
            "supervised_loss": supervised_loss,
            "unlabeled_loss": terms.loss,
            "unlabeled_ce": terms.ce,
            "unlabeled_divergence": terms.div,
        }

    def _log_diagnostics(self, terms: UnlabeledTerms, entropy_mask: torch.Tensor, epsilon: torch.Tensor,
                         hidden_targets: torch.Tensor) -> None:
        self.log_pseudo_labels(terms.pseudo_labels, terms.gate, hidden_targets)
        with torch.no_grad():
            gate, confident = terms.gate, terms.confident
            gated = gate.sum().clamp_min(1.0)
            correct = (terms.pseudo_labels == hidden_targets).float()
            known = (hidden_targets >= 0).float()
            moderate = gate * (1 - confident)
            deferred = 1 - gate

            def accuracy(subset: torch.Tensor) -> torch.Tensor:
                return (subset * correct * known).sum() / (subset * known).sum().clamp_min(1.0)

            stats = {
                "train/gate_rate": gate.mean(),
                "train/entropy_mask_rate": entropy_mask.mean(),
                "train/confident_rate": confident.mean(),
                "train/deferred_rate": deferred.mean(),
                "train/mean_ce_weight_gated": (terms.ce_weight * gate).sum() / gated,
                "train/mean_bell_weight_gated": (terms.weight * gate).sum() / gated,
                "train/entropy_threshold": epsilon,
                "train/entropy_mean": self.entropy_mask.mean,
                "train/entropy_sigma": self.entropy_mask.sigma,
                "train/entropy_k": torch.tensor(self.entropy_mask.k(self.global_step, self.total_steps)),
                "train/pseudo_label_acc_confident": accuracy(confident),
                "train/pseudo_label_acc_moderate": accuracy(moderate),
                "train/pseudo_label_acc_deferred": accuracy(deferred),
            }
            if self.alignment is not None:
                mean = self.alignment.mean_prediction
                stats["train/da_mean_entropy"] = -(mean * mean.clamp_min(1e-12).log()).sum()
        self.log_train(stats, batch_size=gate.shape[0])
