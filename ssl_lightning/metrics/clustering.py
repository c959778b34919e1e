"""Clustering metrics from one contingency table: Hungarian accuracy, NMI and ARI.

The table (predicted cluster × true class) is a sum state, so a DDP evaluation reduces it with one
all-reduce and every rank gets the exact single-process value; the three scores are functions of the
table alone. ``cluster_acc`` maps clusters one-to-one onto classes with the assignment that maximises
the matches (scipy's ``linear_sum_assignment``); ``nmi`` uses the arithmetic-mean normalisation and
``ari`` the adjusted Rand index, both as scikit-learn defines them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

__all__ = ["ClusteringMetrics", "cluster_scores", "hungarian_mapping"]


def hungarian_mapping(contingency: np.ndarray) -> np.ndarray:
    """``mapping[c]`` = the class cluster ``c`` is matched to (maximum total matches, one-to-one)."""
    clusters, classes = linear_sum_assignment(contingency, maximize=True)
    mapping = np.full(contingency.shape[0], -1, dtype=np.int64)
    mapping[clusters] = classes
    return mapping


def _comb2(x: np.ndarray | float) -> np.ndarray | float:
    return x * (x - 1) / 2.0


def cluster_scores(contingency: np.ndarray) -> dict[str, float]:
    """``cluster_acc``, ``nmi``, ``ari`` and ``acc`` (identity mapping) of a cluster × class count table."""
    table = np.asarray(contingency, dtype=np.float64)
    n = table.sum()
    if n == 0:
        return {"cluster_acc": 0.0, "nmi": 0.0, "ari": 0.0, "acc": 0.0}
    clusters, classes = linear_sum_assignment(table, maximize=True)
    cluster_acc = table[clusters, classes].sum() / n
    identity = np.trace(table[: min(table.shape), : min(table.shape)]) / n

    cluster_sizes, class_sizes = table.sum(axis=1), table.sum(axis=0)
    nonzero = table > 0
    outer = np.outer(cluster_sizes, class_sizes)
    mutual_information = float((table[nonzero] / n * np.log(n * table[nonzero] / outer[nonzero])).sum())

    def entropy(sizes: np.ndarray) -> float:
        p = sizes[sizes > 0] / n
        return float(-(p * np.log(p)).sum())

    h_clusters, h_classes = entropy(cluster_sizes), entropy(class_sizes)
    # scikit-learn's conventions: two single-cluster labelings agree perfectly.
    if h_clusters == 0.0 and h_classes == 0.0:
        nmi = 1.0
    else:
        nmi = mutual_information / max((h_clusters + h_classes) / 2.0, np.finfo(np.float64).eps)

    sum_pairs = _comb2(table).sum()
    cluster_pairs, class_pairs = _comb2(cluster_sizes).sum(), _comb2(class_sizes).sum()
    expected = cluster_pairs * class_pairs / _comb2(n) if n > 1 else 0.0
    maximum = (cluster_pairs + class_pairs) / 2.0
    ari = 1.0 if maximum == expected else (sum_pairs - expected) / (maximum - expected)
    return {"cluster_acc": float(cluster_acc), "nmi": float(nmi), "ari": float(ari), "acc": float(identity)}


class ClusteringMetrics(Metric):
    """``cluster_acc``, ``nmi``, ``ari`` and identity-mapped ``acc`` of argmax predictions, plus the number
    of evaluated samples, the largest cluster's share and the number of empty clusters (collapse alarm).

    Targets below 0 (images without a label) are skipped.
    """

    full_state_update = False

    def __init__(self, num_clusters: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.num_classes = num_clusters if num_classes is None else num_classes
        self.add_state(
            "contingency", torch.zeros(num_clusters, self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, logits_or_clusters: torch.Tensor, targets: torch.Tensor) -> None:
        clusters = logits_or_clusters.argmax(dim=1) if logits_or_clusters.ndim == 2 else logits_or_clusters
        known = targets >= 0
        flat = clusters[known].long() * self.num_classes + targets[known].long()
        counts = torch.bincount(flat, minlength=self.num_clusters * self.num_classes)
        self.contingency += counts.view(self.num_clusters, self.num_classes)

    def compute(self) -> dict[str, torch.Tensor]:
        table = self.contingency.cpu().numpy()
        scores = cluster_scores(table)
        sizes = table.sum(axis=1)
        total = max(int(sizes.sum()), 1)
        scores.update({
            "count": float(sizes.sum()),
            "largest_cluster_share": float(sizes.max()) / total,
            "empty_clusters": float((sizes == 0).sum()),
        })
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
