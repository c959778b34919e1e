"""Offline PC-softmax sets: Digits-imbalanced, and a Gaussian mixture whose mutual information is known.

- :class:`DigitsImbalancedDataModule` (spec §6.5): scikit-learn digits at 8x8, pixel/16; odd digits keep all
  their training sources, even digits a tenth (702 training images); val and test are balanced.
- :class:`GaussianMixtureMIDataModule` (spec §6.6): ``x | y=k ~ N(a_k 1_d, I_d)`` with
  ``a = (0, +2, -2, +4, -4)``, balanced or imbalanced. Only the projection ``t = x . 1 / sqrt(d)`` carries
  label information, and ``t | y=k ~ N(a_k sqrt(d), 1)``, so :func:`true_mi` and :func:`bayes_accuracy` are
  1-D computations: ``I(X; Y) = I(T; Y)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import logsumexp, ndtr

from ssl_lightning.data.localization import (
    EvalSplit,
    FixedSplitDataModule,
    FixedSplits,
    digits_source_split,
    first_per_class,
)
from ssl_lightning.data.sources import ArraySource, FeatureSource

__all__ = [
    "BALANCED_COUNTS",
    "DigitsImbalancedDataModule",
    "GAUSSMIX_MEANS",
    "GaussianMixtureMIDataModule",
    "IMBALANCED_COUNTS",
    "bayes_accuracy",
    "gaussian_mixture_scores",
    "sample_gaussian_mixture",
    "true_mi",
    "true_pmi",
]

GAUSSMIX_MEANS: tuple[float, ...] = (0.0, 2.0, -2.0, 4.0, -4.0)
BALANCED_COUNTS: tuple[int, ...] = (10_000,) * 5
IMBALANCED_COUNTS: tuple[int, ...] = (5_000, 10_000, 15_000, 20_000, 25_000)
QUADRATURE_STEP = 1e-3
QUADRATURE_MARGIN = 12.0


# -------------------------------------------------------------------------------------- Digits-imbalanced


class DigitsImbalancedDataModule(FixedSplitDataModule):
    """Digits-imbalanced (spec §6.5), the offline PC-softmax demo.

    The source split of :func:`~ssl_lightning.data.localization.digits_source_split` (1,266 / 178 / 353).
    Train: odd digits keep all their training sources; even digits (the minority) the first
    ``ceil(n_c / 10)`` by ascending dataset index: 702 images (13 per even class, 126-129 per odd class).
    Val and test: balanced, the 178 / 353 sources.

    Input: pixel / 16 (an MLP flattens the 8x8 image to 64 values). Images are stored as the raw sklearn
    values 0..16 in uint8 ``(1, 8, 8)`` and normalised with mean 0 and std 16/255, so the base's
    ``(u / 255 - mean) / std`` is ``u / 16``. The training view is the identity (``weak`` with no padding and
    no flip).
    """

    name = "digits_imbalanced"
    num_classes = 10
    in_channels = 1
    image_size = 8
    mean = (0.0,)
    std = (16 / 255,)
    default_hflip = False
    minority_classes = [0, 2, 4, 6, 8]

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        crop_pad: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         crop_pad=crop_pad, **kwargs)

    def _stream_names(self) -> list[str]:
        return ["val", "test"]

    def build_splits(self) -> FixedSplits:
        digits, targets, sources = digits_source_split()
        train = sources["train"]
        kept = train[first_per_class(targets[train], self.train_quota)]

        def source(rows: np.ndarray) -> ArraySource:
            return ArraySource(digits[rows][:, None].copy(), targets[rows])

        evals = {split: EvalSplit(source(sources[split]), split) for split in ("val", "test")}
        return FixedSplits(train=source(kept), evals=evals)

    @staticmethod
    def train_quota(label: int) -> int:
        """Training sources kept for ``label``: all for odd digits, ``ceil(n_c / 10)`` for even ones."""
        _, targets, sources = digits_source_split()
        available = int(np.sum(targets[sources["train"]] == label))
        return available if label % 2 else math.ceil(available / 10)


# --------------------------------------------------------------------------------------- Gaussian mixture


def _scaled_means(dim: int, means: Sequence[float]) -> np.ndarray:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return np.asarray(means, dtype=np.float64) * math.sqrt(dim)


def _normalised_prior(prior: Sequence[float], classes: int) -> np.ndarray:
    p = np.asarray(prior, dtype=np.float64)
    if p.shape != (classes,) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"prior must hold {classes} non-negative weights, got {list(prior)}")
    return p / p.sum()


def true_mi(dim: int, prior: Sequence[float], means: Sequence[float] = GAUSSMIX_MEANS) -> float:
    """I(X; Y) in nats of the mixture ``x | y=k ~ N(means_k 1_d, I_d)``, ``y ~ prior``.

    ``I = sum_k p_k int phi(t - m_k) [log phi(t - m_k) - log sum_j p_j phi(t - m_j)] dt`` with
    ``m_k = means_k sqrt(d)``, by the trapezoid rule with step 1e-3 over ``[min m - 12, max m + 12]``.
    """
    m = _scaled_means(dim, means)
    p = _normalised_prior(prior, len(m))
    lo, hi = m.min() - QUADRATURE_MARGIN, m.max() + QUADRATURE_MARGIN
    t = np.linspace(lo, hi, math.ceil((hi - lo) / QUADRATURE_STEP) + 1)
    log_phi = -0.5 * (t[None, :] - m[:, None]) ** 2 - 0.5 * math.log(2 * math.pi)  # (K, T)
    support = p > 0
    log_mix = logsumexp(log_phi[support] + np.log(p[support])[:, None], axis=0)
    integrand = (p[support, None] * np.exp(log_phi[support]) * (log_phi[support] - log_mix)).sum(axis=0)
    step = t[1] - t[0]
    return float(step * (integrand.sum() - 0.5 * (integrand[0] + integrand[-1])))


def _decision_intervals(slopes: np.ndarray, intercepts: np.ndarray) -> dict[int, tuple[float, float]]:
    """Where each line ``slope * t + intercept`` is the maximum: the upper envelope of the lines.

    Classes whose line is never on top are absent. Slopes are distinct (distinct means).
    """
    order = [int(k) for k in np.argsort(slopes, kind="stable")]

    def crossing(a: int, b: int) -> float:
        return float((intercepts[a] - intercepts[b]) / (slopes[b] - slopes[a]))

    hull: list[int] = []
    for k in order:
        # The previous top line is dominated if the new line overtakes the one before it no later than it did.
        while len(hull) >= 2 and crossing(hull[-2], k) <= crossing(hull[-2], hull[-1]):
            hull.pop()
        hull.append(k)
    bounds = [-math.inf] + [crossing(a, b) for a, b in zip(hull, hull[1:], strict=False)] + [math.inf]
    return {k: (bounds[i], bounds[i + 1]) for i, k in enumerate(hull)}


def bayes_accuracy(
    dim: int,
    prior: Sequence[float],
    means: Sequence[float] = GAUSSMIX_MEANS,
    rule: Literal["prior", "balanced"] = "prior",
    macro: bool = False,
) -> float:
    """Accuracy (in [0, 1]) of a Bayes decision rule on the mixture, exactly (normal CDFs at the boundaries).

    ``rule="prior"`` decides ``argmax_k p_k N(x; m_k)`` (the Bayes rule for data drawn with ``prior``);
    ``"balanced"`` decides ``argmax_k N(x; m_k)``. ``macro=False`` averages the per-class accuracies with
    ``prior`` (accuracy on data drawn from the prior), ``macro=True`` uniformly.
    """
    m = _scaled_means(dim, means)
    p = _normalised_prior(prior, len(m))
    with np.errstate(divide="ignore"):
        log_weights = np.log(p) if rule == "prior" else np.zeros_like(p)
    if rule not in ("prior", "balanced"):
        raise ValueError(f"rule must be 'prior' or 'balanced', got {rule!r}")
    # log w_k + log N(t; m_k, 1) = m_k t - m_k^2 / 2 + log w_k + (terms shared by every class): lines in t.
    usable = np.isfinite(log_weights)
    slopes, intercepts = m[usable], (log_weights - 0.5 * m**2)[usable]
    classes = np.flatnonzero(usable)
    per_class = np.zeros(len(m))
    for local, (lo, hi) in _decision_intervals(slopes, intercepts).items():
        k = classes[local]
        per_class[k] = ndtr(hi - m[k]) - ndtr(lo - m[k])
    return float(per_class.mean() if macro else (p * per_class).sum())


def gaussian_mixture_scores(x: np.ndarray, means: Sequence[float] = GAUSSMIX_MEANS) -> np.ndarray:
    """``(N, K)`` class log-likelihoods ``log N(x; a_k 1_d, I_d)`` up to a per-sample constant (float64).

    ``-|x - a 1|^2 / 2 = -|x|^2 / 2 + a sum(x) - a^2 d / 2``; the first term is shared by all classes.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    a = np.asarray(means, dtype=np.float64)
    return x.sum(axis=1, keepdims=True) * a[None, :] - 0.5 * x.shape[1] * a[None, :] ** 2


def true_pmi(
    x: np.ndarray, y: np.ndarray, prior: Sequence[float], means: Sequence[float] = GAUSSMIX_MEANS
) -> np.ndarray:
    """Per-sample true PMI ``log p(x | y) - log sum_k p_k p(x | k)`` (nats, float64)."""
    scores = gaussian_mixture_scores(x, means)
    p = _normalised_prior(prior, scores.shape[1])
    with np.errstate(divide="ignore"):
        log_mix = logsumexp(scores + np.log(p)[None, :], axis=1)
    return scores[np.arange(len(scores)), np.asarray(y, dtype=np.int64)] - log_mix


def sample_gaussian_mixture(
    counts: Sequence[int], dim: int, rng: np.random.Generator, means: Sequence[float] = GAUSSMIX_MEANS
) -> tuple[np.ndarray, np.ndarray]:
    """``counts[k]`` samples of each class, in class order: float32 ``(N, dim)`` and int64 labels ``(N,)``."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    x = np.asarray(means, dtype=np.float64)[labels, None] + rng.standard_normal((len(labels), dim))
    return x.astype(np.float32), labels


class GaussianMixtureMIDataModule(FixedSplitDataModule):
    """Synthetic MI set (spec §6.6): 5 Gaussians along ``1_d`` with means ``a = (0, +2, -2, +4, -4)``.

    Train counts per class: 10,000 each (``balanced``) or (5k, 10k, 15k, 20k, 25k); val and test a fifth of
    those, each split drawn with its own seed ``[data_seed, 0 | 1 | 2]``. Inputs are float32 vectors passed
    through unnormalised; they admit no augmentation, so every requested view is the identity. The CLI links
    ``in_channels * image_size**2 = dim`` into an MLP (``in_channels = dim``, ``image_size = 1``).

    Args:
        dim: the dimension ``d``.
        balanced: balanced or imbalanced class counts.
        data_seed: seed of the samples (independent of the training seed).
        count_scale: multiply every count (1.0: the spec's sizes; smaller for quick runs).

    ``minority_classes`` is ``None``: the imbalanced counts are a ramp, not a down-sampling of some classes.
    """

    name = "gaussmix"
    num_classes = 5
    image_size = 1

    def __init__(
        self,
        dim: int = 10,
        balanced: bool = False,
        data_seed: int = 0,
        count_scale: float = 1.0,
        batch_size: int = 2000,
        eval_batch_size: int = 5000,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if count_scale <= 0:
            raise ValueError(f"count_scale must be > 0, got {count_scale}")
        if data_seed < 0:
            raise ValueError(f"data_seed must be >= 0 (numpy seeds are non-negative), got {data_seed}")
        self.dim = dim
        self.in_channels = dim
        self.balanced = balanced
        self.data_seed = data_seed
        self.count_scale = count_scale
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         **kwargs)

    @property
    def dataset_key(self) -> str:
        scale = "" if self.count_scale == 1.0 else f"_x{self.count_scale:g}"
        return f"gaussmix_{'bal' if self.balanced else 'imb'}_d{self.dim}_data{self.data_seed}{scale}"

    def split_counts(self, split: str) -> list[int]:
        """Per-class sample counts of ``train``, ``val`` or ``test``."""
        base = BALANCED_COUNTS if self.balanced else IMBALANCED_COUNTS
        fraction = 1.0 if split == "train" else 0.2
        return [max(1, round(c * fraction * self.count_scale)) for c in base]

    def _stream_names(self) -> list[str]:
        return ["val", "test"]

    def build_splits(self) -> FixedSplits:
        sources = {}
        for offset, split in enumerate(("train", "val", "test")):
            rng = np.random.default_rng([self.data_seed, offset])
            x, y = sample_gaussian_mixture(self.split_counts(split), self.dim, rng)
            sources[split] = FeatureSource(x, y)
        evals = {split: EvalSplit(sources[split], split) for split in ("val", "test")}
        return FixedSplits(train=sources["train"], evals=evals)

    def _views(self, names: list[str] | None, stream: str) -> list[Any]:
        # Feature vectors have no augmentation: each requested view (weak, strong, ...) is the identity.
        return super()._views(["identity"] * len(names) if names else names, stream)

    def prior(self) -> np.ndarray:
        """Class proportions of the training split (float64)."""
        counts = self.class_counts().numpy()
        return counts / counts.sum()

    def true_mi(self) -> float:
        """I(X; Y) of this mixture under the training prior, by quadrature (nats)."""
        return true_mi(self.dim, self.prior())

    def bayes_accuracy(self, rule: Literal["prior", "balanced"] = "prior", macro: bool = False) -> float:
        """Bayes accuracy under the training prior (see :func:`bayes_accuracy`)."""
        return bayes_accuracy(self.dim, self.prior(), rule=rule, macro=macro)

    def test_true_pmi_mean(self, stream: str = "test") -> float:
        """Monte-Carlo mean of the true PMI over the samples of ``stream`` (the training prior; nats)."""
        source = self.eval_split(stream).source
        assert isinstance(source, FeatureSource)
        return float(true_pmi(source.features.numpy(), source.targets, self.prior()).mean())

    def eval_features(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(N, d)`` inputs and int64 labels of an evaluation stream, in loader index order."""
        source = self.eval_split(stream).source
        assert isinstance(source, FeatureSource)
        return source.features, torch.as_tensor(source.targets)
