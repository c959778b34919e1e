"""Clustering metrics (collision spec §8 test 22): permutation invariance, agreement with scipy/sklearn,
and the same value from one process as from two simulated ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ssl_lightning.metrics.clustering import ClusteringMetrics, cluster_scores


def _scores(predictions: np.ndarray, targets: np.ndarray, k: int) -> dict[str, float]:
    metric = ClusteringMetrics(k)
    metric.update(torch.as_tensor(predictions), torch.as_tensor(targets))
    return {name: float(value) for name, value in metric.compute().items()}


def test_a_relabelled_perfect_clustering_scores_one() -> None:
    targets = np.repeat(np.arange(5), 7)
    permutation = np.array([3, 0, 4, 1, 2])
    scores = _scores(permutation[targets], targets, 5)
    assert scores["cluster_acc"] == pytest.approx(1.0)
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["ari"] == pytest.approx(1.0)
    assert scores["acc"] < 1.0  # the identity mapping is not the matched one


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_labelings_match_scipy_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 6
    targets = rng.integers(0, k, 500)
    predictions = np.where(rng.random(500) < 0.6, (targets + 2) % k, rng.integers(0, k, 500))
    scores = _scores(predictions, targets, k)

    table = np.zeros((k, k))
    np.add.at(table, (predictions, targets), 1)
    rows, cols = linear_sum_assignment(-table)
    assert scores["cluster_acc"] == pytest.approx(table[rows, cols].sum() / 500, abs=1e-6)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(targets, predictions), abs=1e-6)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(targets, predictions), abs=1e-6)
    assert scores["acc"] == pytest.approx(float((predictions == targets).mean()), abs=1e-6)


def test_two_simulated_ranks_reduce_to_the_single_process_value() -> None:
    rng = np.random.default_rng(3)
    targets, predictions = rng.integers(0, 4, 301), rng.integers(0, 4, 301)
    whole = _scores(predictions, targets, 4)
    halves = [ClusteringMetrics(4), ClusteringMetrics(4)]
    halves[0].update(torch.as_tensor(predictions[:150]), torch.as_tensor(targets[:150]))
    halves[1].update(torch.as_tensor(predictions[150:]), torch.as_tensor(targets[150:]))
    # What the "sum" all-reduce does to the state.
    reduced = cluster_scores((halves[0].contingency + halves[1].contingency).numpy())
    for key, value in reduced.items():
        assert value == pytest.approx(whole[key], abs=1e-12)


def test_unlabelled_targets_are_skipped_and_logits_accepted() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    metric = ClusteringMetrics(2)
    metric.update(logits, torch.tensor([1, 0, -1]))
    values = metric.compute()
    assert float(values["count"]) == 2 and float(values["cluster_acc"]) == 1.0
    assert float(values["acc"]) == 0.0
