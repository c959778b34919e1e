"""SimMatch (Zheng et al., CVPR 2022): semi-supervised learning with similarity matching.

FixMatch-style pseudo-labelling plus an instance-level consistency against a labeled memory bank, with
the two pseudo-labels propagated into each other (``specs/simmatch.md`` §3):

    p̃  = DA(σ(ℓ^w))                                       sliding-window distribution alignment
    q̂  = norm₁(σ(⟨z^w, Z⟩/t) ⊙ ū),  ū_i = p̃_{y^Z_i}      unfolding + scaling (instance pseudo-label)
    p̂  = α p̃ + (1 − α) a,  a_c = Σ_{i: y^Z_i = c} q^w_i   aggregation + smoothing (semantic pseudo-label)
    L   = L_s + λ_u · 1/μB Σ_b 1[max p̂_b ≥ τ] H(p̂_b, σ(ℓ^s_b)) + λ_in · 1[k ≥ T_w] · 1/μB Σ_b H(q̂_b, q^s_b)

Two teacher/bank variants, chosen by ``teacher`` and never by dataset (§4.2): ``online`` (the student's
own detached outputs, temporal-ensemble bank) and ``ema`` (a separate EMA network with its own BN
statistics, overwrite bank).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.components.distribution_alignment import DistributionAlignment
from ssl_lightning.components.ema import EMAWeights
from ssl_lightning.components.memory_bank import LabeledMemoryBank
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.similarity import instance_consistency, propagate, semantic_consistency
from ssl_lightning.methods.base import Method, cross_entropy
from ssl_lightning.nets.heads import ProjectionHead


class EmbeddingHead(nn.Module):
    """φ: Linear(d, hidden)–ReLU–Linear(hidden, D), no BN; the mean of ``heads`` such heads (EPASS when
    > 1), then L2-normalised."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, heads: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            ProjectionHead(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=False) for _ in range(heads)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = torch.stack([head(features) for head in self.heads]).mean(dim=0)
        # fp32 before normalising: the bank is fp32 and bf16 similarities are off by ~0.04 logits at t = 0.1.
        return F.normalize(projected.float(), dim=-1, eps=1e-6)


class SimMatch(Method):
    """SimMatch.

    Args:
        teacher: ``online`` (small labeled sets) or ``ema`` (large labeled sets; a separate EMA teacher).
        teacher_bn: BatchNorm of the ``ema`` teacher: ``shuffle`` (train mode, batch shuffled across
            ranks), ``local`` (train mode, no shuffle), ``eman`` (eval mode with EMA'd statistics).
        bank_momentum: m_b of the bank update (0: overwrite).
        temperature: similarity temperature t (teacher and student).
        threshold: confidence threshold τ on p̂ (``≥``).
        alpha: smoothing weight α of p̂ = α p̃ + (1 − α) a.
        semantic_fusion: ``smooth`` (the references) or ``scale`` (p̂ = norm₁(p̃ ⊙ a); no reference code).
        da: distribution alignment on; da_window: its N.
        lambda_u, lambda_in: loss weights.
        instance_warmup_steps: T_w, optimizer steps before L_in and propagation start; ``unlabeled_epoch``
            means one pass over the unlabeled pool, ⌊|U|/μB⌋.
        proj_dim: embedding size D; proj_hidden_dim: hidden width (``None``: the feature width d).
        epass_heads: number of averaged projection heads (1 = SimMatch; more is EPASS, filed as
            ``simmatch_epass``).
        eval_weights: which weights the headline reports; both are always evaluated.
        state_check_every: every this many steps, compare checksums of the bank and the DA window across
            ranks and fail if they differ (a debugging aid for multi-GPU runs; 0 disables it).
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method` (``ema_decay`` is m_e).
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = ["weak", "strong"]

    def __init__(
        self,
        teacher: Literal["online", "ema"] = "online",
        teacher_bn: Literal["shuffle", "local", "eman"] = "shuffle",
        bank_momentum: float = 0.7,
        temperature: float = 0.1,
        threshold: float = 0.95,
        alpha: float = 0.9,
        semantic_fusion: Literal["smooth", "scale"] = "smooth",
        da: bool = True,
        da_window: int = 32,
        lambda_u: float = 1.0,
        lambda_in: float = 1.0,
        instance_warmup_steps: int | Literal["unlabeled_epoch"] = 1024,
        proj_dim: int = 128,
        proj_hidden_dim: int | None = None,
        epass_heads: int = 1,
        eval_weights: Literal["ema", "student"] = "ema",
        state_check_every: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if teacher == "ema" and self.ema is None:
            raise ValueError("teacher='ema' needs EMA weights: set --model.ema_decay (e.g. 0.999)")
        if eval_weights == "ema" and self.ema is None:
            raise ValueError("eval_weights='ema' needs --model.ema_decay; use eval_weights='student' without it")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if epass_heads < 1:
            raise ValueError(f"epass_heads must be at least 1, got {epass_heads}")
        self.teacher = teacher
        self.teacher_bn = teacher_bn
        self.temperature = temperature
        self.threshold = threshold
        self.alpha = alpha
        self.semantic_fusion = semantic_fusion
        self.da = da
        self.lambda_u = lambda_u
        self.lambda_in = lambda_in
        self.instance_warmup = instance_warmup_steps
        self.eval_weights = eval_weights
        self.epass_heads = epass_heads
        self.state_check_every = state_check_every

        width = self.backbone.num_features
        self.projection = EmbeddingHead(width, proj_hidden_dim or width, proj_dim, epass_heads)
        self.alignment = DistributionAlignment(self.num_classes, da_window)
        self.bank = LabeledMemoryBank(proj_dim, momentum=bank_momentum)
        self.teacher_projection: EMAWeights | None = None
        if teacher == "ema":
            assert self.ema is not None
            # The teacher keeps the BN statistics of its own forwards (or averages them, EMAN); it never
            # copies the student's, which would mix two networks' activations.
            self.ema.buffers_policy = "average" if teacher_bn == "eman" else "own"
            self.teacher_projection = EMAWeights(self.projection, self.ema.decay)
        self._bank_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def method_name(self) -> str:
        return "simmatch_epass" if self.epass_heads > 1 else "simmatch"

    @property
    def headline_weights(self) -> str:
        return "ema" if self.eval_weights == "ema" else "raw"

    # ----- set-up: the bank is sized by the labeled subset -------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "labeled_subset"):
            if self.bank.size == 0:
                raise TypeError("SimMatch needs an SSLDataModule (its bank has one slot per labeled example), "
                                "or a bank sized by bank.reset() before training")
            return
        if stage == "fit":
            pool_indices, labels = datamodule.labeled_subset()
            # Seeded by the run seed, so every rank starts from the same bank (DDP broadcasts it anyway).
            self.bank.reset(pool_indices, labels, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
            if self.instance_warmup == "unlabeled_epoch":
                self.instance_warmup = datamodule.unlabeled_epoch_steps()

    @property
    def instance_warmup_steps(self) -> int:
        if not isinstance(self.instance_warmup, int):
            raise RuntimeError("instance_warmup_steps='unlabeled_epoch' is resolved in setup('fit')")
        return self.instance_warmup

    # ----- forward passes ----------------------------------------------------------------------------
    def _student(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.backbone.forward_with_features(self._memory_format(images))
        return logits, self.projection(features)

    @torch.no_grad()
    def _teacher(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA teacher's logits and embeddings; BN in train mode unless ``teacher_bn='eman'``."""
        assert self.ema is not None and self.teacher_projection is not None
        network = self.ema.module
        shuffle = self.teacher_bn == "shuffle" and self.world_size > 1
        if shuffle:
            # Shuffle-BN: every rank normalises a random slice of the global batch, so BN statistics
            # cannot leak which images sit together on a rank. The permutation is drawn alike everywhere.
            n = images.shape[0]
            local = slice(self.global_rank * n, (self.global_rank + 1) * n)
            permutation = torch.randperm(n * self.world_size, generator=self.step_generator(salt=7),
                                         device=images.device)
            images = self.gather_global(images)[permutation][local]
        network.train(self.teacher_bn != "eman")
        try:
            logits, features = network.forward_with_features(self._memory_format(images))
        finally:
            network.eval()
        embeddings = self.teacher_projection(features)
        if shuffle:
            restored_logits = torch.empty_like(logits_all := self.gather_global(logits))
            restored_logits[permutation] = logits_all
            restored_embeddings = torch.empty_like(embeddings_all := self.gather_global(embeddings))
            restored_embeddings[permutation] = embeddings_all
            logits, embeddings = restored_logits[local], restored_embeddings[local]
        return logits, embeddings

    # ----- the objective -----------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        labeled_images, (weak, strong) = labeled.views[0], unlabeled.views
        n_labeled = labeled_images.shape[0]

        if self.teacher == "online":
            # One forward over cat(x, u_w, u_s): BN statistics mix the three groups (reference behaviour).
            logits, embeddings = self._student(torch.cat([labeled_images, weak, strong]))
            logits_l, logits_weak, logits_strong = logits.split([n_labeled, weak.shape[0], strong.shape[0]])
            embeddings_l, embeddings_weak, embeddings_strong = embeddings.split(
                [n_labeled, weak.shape[0], strong.shape[0]]
            )
            logits_weak, embeddings_weak, bank_embeddings = (
                logits_weak.detach(), embeddings_weak.detach(), embeddings_l.detach()
            )
        else:
            logits, embeddings = self._student(torch.cat([labeled_images, strong]))
            logits_l, logits_strong = logits.split([n_labeled, strong.shape[0]])
            embeddings_strong = embeddings[n_labeled:]
            teacher_logits, teacher_embeddings = self._teacher(torch.cat([labeled_images, weak]))
            logits_weak, embeddings_weak = teacher_logits[n_labeled:], teacher_embeddings[n_labeled:]
            bank_embeddings = teacher_embeddings[:n_labeled]
        # Written into the bank after the optimizer step (on_train_batch_end), as the spec orders it.
        self._bank_batch = (bank_embeddings, labeled.targets, labeled.indices)

        supervised_loss = cross_entropy(logits_l, labeled.targets)
        weak_probs = logits_weak.float().softmax(dim=1)
        if self.da:
            self.alignment.push(weak_probs)
            log_aligned = self.alignment.log_align(logits_weak)
        else:
            log_aligned = F.log_softmax(logits_weak.float(), dim=1)

        propagating = self.global_step >= self.instance_warmup_steps
        if propagating:
            targets = propagate(
                embeddings_weak, self.bank.embeddings, self.bank.labels, log_aligned,
                self.temperature, self.alpha, self.semantic_fusion,
            )
            semantic_target = targets.semantic_target
        else:
            semantic_target = log_aligned.exp()
        confidence, pseudo_labels = semantic_target.max(dim=1)
        pseudo_label_mask = (confidence >= self.threshold).float()
        unlabeled_loss = semantic_consistency(semantic_target, logits_strong, pseudo_label_mask)

        terms = {"supervised_loss": supervised_loss, "unlabeled_loss": unlabeled_loss}
        loss = supervised_loss + self.lambda_u * unlabeled_loss
        if propagating:
            instance_loss = instance_consistency(
                targets.instance_target, embeddings_strong, self.bank.embeddings, self.temperature
            )
            loss = loss + self.lambda_in * instance_loss
            terms["instance_loss"] = instance_loss
        else:
            # L_in is not computed during warm-up (computing it and multiplying by 0 propagates NaN);
            # a finite zero keeps the head in the graph so DDP finds no unused parameter.
            loss = loss + 0.0 * embeddings_strong.sum()

        self._log_diagnostics(pseudo_labels, pseudo_label_mask, unlabeled.targets,
                              targets.aggregated if propagating else None)
        return {"loss": loss, **terms}

    def _log_diagnostics(self, pseudo_labels: torch.Tensor, mask: torch.Tensor, hidden_targets: torch.Tensor,
                         aggregated: torch.Tensor | None) -> None:
        self.log_pseudo_labels(pseudo_labels, mask, hidden_targets)
        with torch.no_grad():
            mean_prediction = self.alignment.mean()
            stats = {
                "train/bank_visited_fraction": self.bank.visited_fraction(),
                "train/da_mean_entropy": -(mean_prediction * mean_prediction.clamp_min(1e-12).log()).sum(),
                "train/nonfinite_skips": (self.bank.nonfinite_skips + self.alignment.nonfinite_skips).float(),
            }
            if aggregated is not None:
                stats["train/propagation_agreement"] = (aggregated.argmax(dim=1) == pseudo_labels).float().mean()
        self.log_train(stats, batch_size=pseudo_labels.shape[0])
        if self.global_step == self.instance_warmup_steps and self.bank.visited_fraction() < 1.0:
            warnings.warn(
                f"SimMatch: only {float(self.bank.visited_fraction()):.1%} of the bank's slots were written "
                f"in the {self.instance_warmup_steps} warm-up steps; propagation starts from random "
                "embeddings for the rest. Lengthen --model.instance_warmup_steps.",
                stacklevel=2,
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # EMA of the backbone
        if self.teacher_projection is not None:
            self.teacher_projection.update(self.projection)
        if self._bank_batch is not None:
            self.bank.update(*self._bank_batch)
            self._bank_batch = None
        if self.state_check_every and self.global_step % self.state_check_every == 0:
            self._check_state_in_sync()

    # ----- multi-GPU state -----------------------------------------------------------------------------
    def _check_state_in_sync(self) -> None:
        """All ranks must hold the same bank and DA window (spec §4.4, debug mode)."""
        if self.world_size == 1:
            return
        checksum = torch.stack([
            self.bank.embeddings.double().sum(), self.bank.labels.double().sum(),
            self.alignment.rows.double().sum(), self.alignment.pointer.double(),
        ])
        gathered = self.all_gather(checksum)
        if not torch.equal(gathered.amax(dim=0), gathered.amin(dim=0)):
            raise RuntimeError(
                f"SimMatch state diverged across ranks at step {self.global_step}: checksums per rank "
                f"(bank, labels, DA window, pointer) = {gathered.tolist()}"
            )

    def _broadcast_norm_statistics(self) -> None:
        # With broadcast_buffers=False (the bank alone is 65 MB at ImageNet-10%), per-rank BatchNorm
        # statistics drift apart; evaluate everywhere with rank 0's, as default DDP would.
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                for buffer in module.buffers():
                    torch.distributed.broadcast(buffer, src=0)

    def on_validation_epoch_start(self) -> None:
        self._broadcast_norm_statistics()

    def on_test_epoch_start(self) -> None:
        self._broadcast_norm_statistics()
