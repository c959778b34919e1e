"""Self-labelled clustering with the collision cross-entropy (Zhang & Boykov, arXiv 2303.07321).

Each training step alternates, on the **global** batch (spec §3.3):

    y-step   y = argmin_y  (1/N) Σ_i H₂(y_i, σ_i) + λ̃ KL(u ‖ ȳ)        σ fixed, float64, EM from y⁰ = σ
    θ-step   L = (1/B) Σ_i H₂(y_i, σ_i) + γ (1/B) Σ_i H₂(y_i, σ′_i)  [+ w_sup · CE on the labeled stream]

with H₂(y, σ) = −ln σᵀy, σ the prediction of the clean view and σ′ that of the augmented view. The
logits of every rank are gathered without gradient, rank 0 solves for y and broadcasts it, and each rank
trains on its own rows: the solution never depends on the GPU count. The baselines of the paper's tables
(IMSAT, IIC, SeLa, MIADM, MIGD, the forward-KL collision loss (10), k-means on fixed features) are
values of ``loss`` under the same trainer, views, optimiser and metrics. No state survives a step.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.cluster import KMeans
from torch import nn

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.collision import (
    collision_cross_entropy,
    iic_loss,
    imsat_loss,
    migd_loss,
    sinkhorn_pseudo_labels,
    soft_cross_entropy,
)
from ssl_lightning.methods.base import Method, cross_entropy
from ssl_lightning.metrics.clustering import ClusteringMetrics
from ssl_lightning.solvers import SolverStats, set_solver_threads, solve_pseudo_labels, warm_up_solver

LossName = Literal["collision", "collision_fwd", "miadm", "sela", "imsat", "iic", "migd", "none", "kmeans"]
# Losses whose network term trains on pseudo-labels y solved from the gathered predictions.
_SOLVED: dict[str, str] = {"collision": "collision", "collision_fwd": "collision_fwd", "miadm": "miadm"}
# Losses computed from statistics of the whole global batch (gathered with gradients).
_BATCH_STATISTIC = ("imsat", "iic", "migd")


def kmeans_baseline(
    train_features: np.ndarray, eval_features: np.ndarray, num_clusters: int, seed: int, n_init: int = 1
) -> np.ndarray:
    """Cluster indices of ``eval_features`` from scikit-learn k-means fitted on ``train_features``."""
    model = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
    model.fit(np.asarray(train_features, dtype=np.float64).reshape(len(train_features), -1))
    return model.predict(np.asarray(eval_features, dtype=np.float64).reshape(len(eval_features), -1))


class Collision(Method):
    """Collision cross-entropy clustering and its baselines (see the module docstring).

    Args:
        loss: ``collision`` (loss (11), EM), ``collision_fwd`` (loss (10), PGD), ``miadm`` (loss (5) with
            Shannon CE, PGD), ``sela`` (Sinkhorn hard labels), ``imsat``, ``iic``, ``migd``, ``none`` (only the
            supervised term of the weakly-supervised mode) or ``kmeans`` (fixed features only: k-means
            fitted once on the training features, no gradient step).
        lambda_fair: fairness weight λ of the y-step (100 in the paper; ``miadm`` uses ``miadm_lambda``).
        fairness_scale: ``mean``: λ̃ = λ (collision term averaged over the batch); ``per_batch_sum``:
            λ̃ = λ / N with N the global batch (spec P1: collapses on digits, kept for the calibration sweep).
        em_iters: EM iterations per batch from y⁰ = σ (a hyperparameter, not a tolerance: spec P2).
        em_tol: stop EM early when F decreases by less than ``em_tol``·max(1, |F|) (0: always ``em_iters``).
        solver: ``em`` (only for ``collision``), ``pgd`` or ``argmax`` (hard self-training, a test switch);
            ``None`` picks EM for ``collision`` and PGD for the losses only PGD solves.
        pgd_iters, pgd_step: PGD iterations and step (``None``: 0.1 / (1 + λ̃)).
        network_loss: the θ-step's loss on the soft pseudo-labels: ``collision`` (H₂) or ``shannon``
            (H(y, σ)); ``None``: Shannon for ``miadm`` (its loss (5)), collision otherwise. With the same
            EM y-step, ``shannon`` isolates what the collision cross-entropy itself contributes.
        aug_weight: γ, weight of the augmented view's term (0 in fixed-feature mode).
        supervised_weight: w_sup of the cross-entropy on the labeled stream (weakly-supervised mode).
        miadm_lambda, migd_weight, imsat_lambda, imsat_mu, sela_lambda: the baselines' weights.
        solver_threads: threads of the Numba solver (``None``: min(8, torch's intra-op threads), so the
            solver's pool never competes with torch's on a small machine).
        kmeans_n_init: k-means restarts (``loss=kmeans``; 1 mirrors the paper's large k-means std).
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method` (EMA off by default:
            the method keeps no state, so ``test`` equals ``test_raw``).
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = ["test", "affine"]

    def __init__(
        self,
        loss: LossName = "collision",
        lambda_fair: float = 100.0,
        fairness_scale: Literal["mean", "per_batch_sum"] = "mean",
        em_iters: int = 5,
        em_tol: float = 0.0,
        solver: Literal["em", "pgd", "argmax"] | None = None,
        pgd_iters: int = 50,
        pgd_step: float | None = None,
        network_loss: Literal["collision", "shannon"] | None = None,
        aug_weight: float = 0.5,
        supervised_weight: float = 1.0,
        miadm_lambda: float = 1.3,
        migd_weight: float = 1.3,
        imsat_lambda: float = 0.1,
        imsat_mu: float = 4.0,
        sela_lambda: float = 25.0,
        solver_threads: int | None = None,
        kmeans_n_init: int = 1,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(ema_decay=ema_decay, **kwargs)
        if solver == "em" and loss != "collision":
            raise ValueError(
                f"solver=em solves loss (11) only; loss={loss!r} needs solver=pgd (or leave solver unset)"
            )
        self.loss_name = loss
        self.lambda_fair = lambda_fair
        self.fairness_scale = fairness_scale
        self.em_iters = em_iters
        self.em_tol = em_tol
        self.solver = solver or ("em" if loss == "collision" else "pgd")
        self.pgd_iters = pgd_iters
        self.pgd_step = pgd_step
        self.network_loss = network_loss or ("shannon" if loss == "miadm" else "collision")
        self.aug_weight = aug_weight
        self.supervised_weight = supervised_weight
        self.miadm_lambda = miadm_lambda
        self.migd_weight = migd_weight
        self.imsat_lambda = imsat_lambda
        self.imsat_mu = imsat_mu
        self.sela_lambda = sela_lambda
        self.solver_threads = solver_threads
        self.kmeans_n_init = kmeans_n_init
        # k-means centroids (``loss=kmeans``); empty otherwise, resized when a checkpoint carries them.
        self.register_buffer("centroids", torch.zeros(0))

    @property
    def method_name(self) -> str:
        # Results of the baselines are filed apart from the method's own: collision_imsat, collision_fwd, ...
        return self.loss_name if self.loss_name.startswith("collision") else f"collision_{self.loss_name}"

    @property
    def headline_metric(self) -> str:
        return "cluster_acc"

    # ----- setup -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.loss_name in _SOLVED and self.solver != "argmax":
            set_solver_threads(self.solver_threads or min(8, torch.get_num_threads()))
            warm_up_solver()
        if self.loss_name == "kmeans" and stage == "fit" and self.centroids.numel() == 0:
            self._fit_kmeans()

    def _fit_kmeans(self) -> None:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "train_features"):
            raise ValueError("loss=kmeans runs on fixed features: use FixedFeatureDataModule as --data")
        features, _ = datamodule.train_features()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        model = KMeans(n_clusters=self.num_classes, n_init=self.kmeans_n_init, random_state=seed)
        model.fit(np.asarray(features, dtype=np.float64))
        self.centroids = torch.as_tensor(model.cluster_centers_, dtype=torch.float32, device=self.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "kmeans":
            # Logits = negative squared distances: argmax is the nearest centroid.
            return -torch.cdist(images.flatten(1).float(), self.centroids).square()
        return super().forward(images)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "centroids"
        if key in state_dict:
            self.centroids = torch.empty_like(state_dict[key], device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, StreamBatch], batch_idx: int) -> torch.Tensor | None:
        if self.loss_name == "kmeans":
            return None  # k-means was fitted in setup; there is nothing to optimise
        return super().training_step(batch, batch_idx)

    def effective_lambda(self, global_batch: int) -> float:
        weight = self.miadm_lambda if self.loss_name == "miadm" else self.lambda_fair
        return weight if self.fairness_scale == "mean" else weight / global_batch

    def solve_targets(self, global_logits: torch.Tensor) -> tuple[torch.Tensor, SolverStats | None]:
        """The y-step on the gathered logits: solved once on rank 0 (float64, CPU) and broadcast."""
        stats: SolverStats | None = None
        if self.global_rank == 0 or self.world_size == 1:
            sigma = torch.softmax(global_logits.double(), dim=1).cpu().numpy()
            if self.loss_name == "sela":
                targets = nn.functional.one_hot(
                    sinkhorn_pseudo_labels(torch.from_numpy(sigma), lam=self.sela_lambda), self.num_classes
                ).double().numpy()
            else:
                targets, stats = solve_pseudo_labels(
                    sigma,
                    self.effective_lambda(len(sigma)),
                    solver=self.solver,
                    objective=_SOLVED[self.loss_name],  # type: ignore[arg-type]
                    iters=self.em_iters if self.solver == "em" else self.pgd_iters,
                    tol=self.em_tol,
                    step_size=self.pgd_step,
                )
            y = torch.as_tensor(targets, dtype=torch.float32, device=global_logits.device)
        else:
            y = torch.empty(global_logits.shape, dtype=torch.float32, device=global_logits.device)
        if self.world_size > 1:
            dist.broadcast(y, src=0)
        return y, stats

    def _local_rows(self, global_tensor: torch.Tensor, local_size: int) -> torch.Tensor:
        start = self.global_rank * local_size if self.world_size > 1 else 0
        return global_tensor[start : start + local_size]

    def _gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same global loss; the gather's backward sums the ranks' gradients and
        # DDP's averaging then reproduces the single-process gradient.
        if self.world_size == 1:
            return tensor
        return self.all_gather(tensor, sync_grads=True).flatten(0, 1)

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        unlabeled, labeled = batch["unlabeled"], batch.get("labeled")
        views = [labeled.views[0]] if labeled is not None else []
        views += unlabeled.views
        logits = self.forward_views(views)
        logits_labeled = logits.pop(0).float() if labeled is not None else None
        logits_clean = logits[0].float()
        logits_aug = logits[1].float() if len(logits) > 1 else None
        if logits_aug is None and self.aug_weight > 0 and self.loss_name not in ("none", "migd"):
            raise ValueError("aug_weight > 0 needs two unlabeled views (clean, augmented): set --data.unlabeled_views")

        terms: dict[str, torch.Tensor] = {}
        if self.loss_name in _SOLVED or self.loss_name == "sela":
            unsupervised = self._pseudo_label_loss(logits_clean, logits_aug, unlabeled.targets, terms)
        elif self.loss_name in _BATCH_STATISTIC:
            unsupervised = self._batch_statistic_loss(logits_clean, logits_aug)
        else:  # "none": only the supervised term
            unsupervised = logits_clean.sum() * 0.0
        terms["unsupervised_loss"] = unsupervised
        loss = unsupervised
        if logits_labeled is not None:
            supervised = cross_entropy(logits_labeled, labeled.targets)
            terms["supervised_loss"] = supervised
            loss = loss + self.supervised_weight * supervised
        terms["loss"] = loss
        return terms

    def _pseudo_label_loss(
        self, logits_clean: torch.Tensor, logits_aug: torch.Tensor | None, hidden_targets: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        global_logits = self.gather_global(logits_clean.detach())
        global_y, stats = self.solve_targets(global_logits)
        y = self._local_rows(global_y, logits_clean.shape[0])
        network_loss = soft_cross_entropy if self.network_loss == "shannon" else collision_cross_entropy
        loss = network_loss(logits_clean, y)
        terms["clean_loss"] = loss.detach()
        if logits_aug is not None and self.aug_weight > 0:
            augmented = network_loss(logits_aug, y)
            terms["augmented_loss"] = augmented.detach()
            loss = loss + self.aug_weight * augmented
        self._log_solver(global_y, global_logits, stats, hidden_targets)
        return loss

    def _batch_statistic_loss(self, logits_clean: torch.Tensor, logits_aug: torch.Tensor | None) -> torch.Tensor:
        clean = self._gather_with_grad(logits_clean)
        if self.loss_name == "migd":
            return migd_loss(clean, fairness_weight=self.migd_weight)
        assert logits_aug is not None
        augmented = self._gather_with_grad(logits_aug)
        if self.loss_name == "imsat":
            return imsat_loss(clean, augmented, lam=self.imsat_lambda, mu=self.imsat_mu)
        return iic_loss(clean, augmented)

    def _log_solver(
        self, y: torch.Tensor, global_logits: torch.Tensor, stats: SolverStats | None, hidden_targets: torch.Tensor
    ) -> None:
        with torch.no_grad():
            y_mean = y.mean(dim=0).clamp_min(1e-12)
            uniform = 1.0 / self.num_classes
            values = {
                "train/kl_uniform_to_y_mean": (uniform * (math.log(uniform) - y_mean.log())).sum(),
                "train/y_max_mean": y.max(dim=1).values.mean(),
                "train/collision_ce_global": collision_cross_entropy(global_logits.float(), y),
                "train/pseudo_label_max_share": torch.bincount(
                    y.argmax(dim=1), minlength=self.num_classes
                ).max().float() / y.shape[0],
            }
            if stats is not None:
                values.update({
                    "train/solver_iterations": torch.tensor(float(stats.iterations)),
                    "train/solver_objective": torch.tensor(stats.objective),
                    "train/solver_newton_mean": torch.tensor(stats.newton_mean),
                    "train/solver_newton_max": torch.tensor(float(stats.newton_max)),
                    "train/solver_zero_support_rows": torch.tensor(float(stats.zero_support_rows)),
                    "train/solver_ms": torch.tensor(stats.wall_ms),
                })
        # Rank 0 alone has the solver's statistics; every other value is identical on all ranks.
        self.log_train({k: v.to(self.device) for k, v in values.items()}, batch_size=y.shape[0], rank_zero_only=True)

    # ----- evaluation ------------------------------------------------------------------------------
    def _metrics(self, stream: str, weights: str):  # noqa: ANN202
        key = f"{stream}_{weights}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = ClusteringMetrics(self.num_classes).to(self.device)
        return self.eval_metrics[key]

    def _evaluate(self, batch: StreamBatch, stream: str) -> None:
        logits = self(batch.views[0]).float()
        self._metrics(stream, "raw").update(logits, batch.targets)
        if stream == "test":
            self.test_confusion.update(logits.argmax(dim=1), batch.targets.clamp_min(0))

    def _log_stream(self, stream: str) -> None:
        key = f"{stream}_raw"
        if key in self.eval_metrics and not self.trainer.sanity_checking:
            metric = self.eval_metrics[key]
            if int(metric.contingency.sum()) > 0:
                values = metric.compute()
                if values["largest_cluster_share"] > 0.5 or values["empty_clusters"] > 0:
                    rank_zero_warn(
                        f"collapse alarm on {stream}: the largest cluster holds "
                        f"{float(values['largest_cluster_share']):.0%} of the predictions and "
                        f"{int(values['empty_clusters'])} clusters are empty"
                    )
        super()._log_stream(stream)

    def on_test_epoch_end(self) -> None:
        self._log_stream("test")
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
