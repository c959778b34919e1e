"""Top-label reliability bins: the per-bin statistics behind the ECE, kept for the reliability diagram."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ReliabilityBins(Metric):
    """Count, summed top-1 confidence and summed top-1 correctness in ``n_bins`` equal-width confidence bins.

    Binning follows torchmetrics' ``MulticlassCalibrationError``: edges ``linspace(0, 1, n_bins + 1)`` in
    float32, bins closed on the left and open on the right, so a confidence exactly on an inner edge goes to
    the bin above it. torchmetrics also gives a confidence of exactly 1.0 a bin of its own; such samples are
    kept apart in ``saturated_count`` / ``saturated_correct`` so that ``ece`` equals torchmetrics' value,
    while the returned per-bin statistics fold them into the last bin, which is where a plot expects them.

    ``compute()`` returns ``count``, ``confidence`` (mean per bin), ``accuracy`` (per bin; both 0 where
    the bin is empty) and ``ece`` (L1, weighted by bin frequency).
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        self.n_bins = n_bins
        self.add_state("count", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("confidence_sum", "correct_sum"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("saturated_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "saturated_correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, logits: Tensor, target: Tensor) -> None:
        probabilities = logits.float().softmax(dim=1)
        confidence, prediction = probabilities.max(dim=1)
        correct = prediction.eq(target).double()
        # Same float32 edges and the same bucketize convention as torchmetrics, so that inputs falling
        # exactly on an edge land in the same bin there and here.
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float32, device=confidence.device)
        index = torch.bucketize(confidence, edges, right=True) - 1
        saturated = index >= self.n_bins
        self.saturated_count += saturated.sum()
        self.saturated_correct += correct[saturated].sum()
        keep = ~saturated
        index, confidence, correct = index[keep], confidence[keep], correct[keep]
        self.count.scatter_add_(0, index, torch.ones_like(index))
        self.confidence_sum.scatter_add_(0, index, confidence.double())
        self.correct_sum.scatter_add_(0, index, correct)

    def compute(self) -> dict[str, Tensor]:
        total = (self.count.sum() + self.saturated_count).clamp(min=1).double()
        # count_b / N * |acc_b - conf_b| = |correct_sum_b - confidence_sum_b| / N; the saturated bin has
        # confidence exactly 1 per sample, so its confidence sum is its count.
        gap = (self.correct_sum - self.confidence_sum).abs().sum()
        gap = gap + (self.saturated_correct - self.saturated_count.double()).abs()
        ece = gap / total

        count = self.count.clone()
        confidence_sum = self.confidence_sum.clone()
        correct_sum = self.correct_sum.clone()
        count[-1] += self.saturated_count
        confidence_sum[-1] += self.saturated_count.double()
        correct_sum[-1] += self.saturated_correct
        occupied = count.clamp(min=1).double()
        return {
            "count": count,
            "confidence": (confidence_sum / occupied).float(),
            "accuracy": (correct_sum / occupied).float(),
            "ece": ece.float(),
        }
