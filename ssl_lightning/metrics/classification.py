"""Evaluation metrics of every classifier, as torchmetrics (synced across ranks by construction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score


class NegativeLogLikelihood(Metric):
    """Mean cross-entropy of the predicted distribution at the true label (natural log)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.total += F.cross_entropy(logits.float(), target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


def classification_metrics(num_classes: int) -> MetricCollection:
    """``acc``, ``acc_top5`` (when there are more than 5 classes), ``macro_f1``, ``ece`` (15 bins), ``nll``.

    Every metric takes logits; the probability-based ones apply the softmax themselves.
    """
    metrics: dict[str, Metric] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
        "nll": NegativeLogLikelihood(),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)
