"""Projected gradient descent on the self-labelling objectives (5), (10), (11) (specs/collision_ce.md §3.5).

Each iteration is y_i ← Π_Δ(y_i − η g_i) from y⁰ = σ, where g = N ∂F/∂y (ȳ clamped ≥ 1e-12):

    (11) collision      g_ik = −σ_ik / σ_iᵀy_i − λ̃ u_k / ȳ_k
    (10) collision_fwd  g_ik = −σ_ik / σ_iᵀy_i + λ̃ (ln(ȳ_k / u_k) + 1)
    (5)  miadm          g_ik = −ln σ_ik + λ̃ (ln(K ȳ_k) + 1)

and Π_Δ is the sort-based Euclidean projection onto the simplex (Chen & Ye 2011): with x sorted,
θ = (Σ_{j>i} x_(j) − 1)/(K − i) for the largest i such that θ ≥ x_(i), and Π_Δ(x) = max(x − θ, 0).
PGD is the generic baseline of the paper's Table 1 and the only solver here for (10) and (5). Like the
EM kernel it comes as a vectorised NumPy reference and a numba kernel (rows in parallel, the column
means serial in a fixed order).
"""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np
from numba import njit, prange

from ssl_lightning.losses.collision import MEAN_FLOOR

PgdObjective = Literal["collision", "collision_fwd", "miadm"]
OBJECTIVE_CODES: dict[str, int] = {"collision": 0, "collision_fwd": 1, "miadm": 2}

_TINY64 = float(np.finfo(np.float64).tiny)
# σᵀy is floored here in the gradient: y may start on a face where σᵀy = 0, and σ_k / 1e-300 (≤ 1e300)
# keeps the projection's partial sums finite for any practical K, where the smallest normal would not.
AGREEMENT_FLOOR = 1e-300


def default_step_size(lam_eff: float) -> float:
    """η = 0.1 / (1 + λ̃): the fairness gradient grows with λ̃, so the stable step shrinks with it."""
    return 0.1 / (1.0 + lam_eff)


def project_simplex(x: np.ndarray) -> np.ndarray:
    """Euclidean projection of every row of x (N, K) onto the probability simplex, sort-based.

    Returns a new array; with u the (shifted) row sorted in decreasing order and ρ the number of j such that
    u_j > (Σ_{l≤j} u_l − 1)/j, θ = (Σ_{l≤ρ} u_l − 1)/ρ and Π(x) = max(x − θ, 0).
    """
    x = np.asarray(x, dtype=np.float64)
    # The projection commutes with shifting a row by a constant; shifting the maximum to 0 keeps the
    # partial sums at the scale of the gaps, so a huge gradient step still lands exactly on a vertex.
    x = x - x.max(axis=1, keepdims=True)
    decreasing = -np.sort(-x, axis=1)
    partial = np.cumsum(decreasing, axis=1) - 1.0
    ranks = np.arange(1, x.shape[1] + 1)
    count = (decreasing - partial / ranks > 0).sum(axis=1)
    theta = partial[np.arange(x.shape[0]), count - 1] / count
    return np.maximum(x - theta[:, None], 0.0)


def objective_gradient(sigma: np.ndarray, y: np.ndarray, lam_eff: float, objective: PgdObjective) -> np.ndarray:
    """g = N ∂F/∂y for the chosen objective (the table above), float64 (N, K)."""
    n, k = sigma.shape
    mean_label = np.maximum(y.mean(axis=0), MEAN_FLOOR)
    if objective == "miadm":
        return -np.log(np.maximum(sigma, _TINY64)) + lam_eff * (np.log(k * mean_label) + 1.0)
    agreement = np.maximum(np.einsum("ik,ik->i", sigma, y), AGREEMENT_FLOOR)[:, None]
    if objective == "collision":
        return -sigma / agreement - lam_eff / (k * mean_label)
    if objective == "collision_fwd":
        return -sigma / agreement + lam_eff * (np.log(k * mean_label) + 1.0)
    raise ValueError(f"objective must be 'collision', 'collision_fwd' or 'miadm', got {objective!r}")


def pgd_step_numpy(sigma: np.ndarray, y: np.ndarray, lam_eff: float, step_size: float,
                   objective: PgdObjective) -> np.ndarray:
    """One PGD iteration of the NumPy reference: Π_Δ(y − η g)."""
    return project_simplex(y - step_size * objective_gradient(sigma, y, lam_eff, objective))


@njit(cache=True, error_model="numpy")
def _fairness_gradient(y: np.ndarray, lam_eff: float, kind: int, out: np.ndarray) -> None:
    # Serial, fixed-order column sums (bit-identical for any thread count).
    n, k_classes = y.shape
    for k in range(k_classes):
        out[k] = 0.0
    for i in range(n):
        for k in range(k_classes):
            out[k] += y[i, k]
    for k in range(k_classes):
        mean = max(out[k] / n, MEAN_FLOOR)
        if kind == 0:
            out[k] = -lam_eff / (k_classes * mean)
        else:
            out[k] = lam_eff * (np.log(k_classes * mean) + 1.0)


@njit(cache=True, error_model="numpy")
def _sift_down(values: np.ndarray, root: int, end: int) -> None:
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and values[child] < values[child + 1]:
            child += 1
        if values[root] >= values[child]:
            return
        values[root], values[child] = values[child], values[root]
        root = child


@njit(cache=True, error_model="numpy")
def _heapsort(values: np.ndarray) -> None:
    # In place, ascending. As fast as ndarray.sort here, but numba compiles it in a fraction of the time
    # its generic quicksort takes, which matters on a cold cache (fresh checkout, CI).
    n = values.shape[0]
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(values, start, n)
    for end in range(n - 1, 0, -1):
        values[0], values[end] = values[end], values[0]
        _sift_down(values, 0, end)


@njit(cache=True, error_model="numpy")
def _pgd_row(sigma: np.ndarray, y: np.ndarray, fairness: np.ndarray, step_size: float, kind: int,
             out: np.ndarray, work: np.ndarray) -> None:
    k_classes = sigma.shape[0]
    if kind == 2:
        for k in range(k_classes):
            work[k] = y[k] - step_size * (-np.log(max(sigma[k], _TINY64)) + fairness[k])
    else:
        agreement = 0.0
        for k in range(k_classes):
            agreement += sigma[k] * y[k]
        agreement = max(agreement, AGREEMENT_FLOOR)
        for k in range(k_classes):
            work[k] = y[k] - step_size * (-sigma[k] / agreement + fairness[k])
    top = work[0]
    for k in range(k_classes):
        top = max(top, work[k])
    for k in range(k_classes):
        work[k] -= top  # see project_simplex: shift the maximum to 0
        out[k] = work[k]
    _heapsort(out)
    # Chen & Ye: walk down the sorted values accumulating the tail until the threshold clears the next one.
    tail = 0.0
    theta = np.nan
    for i in range(k_classes - 1, 0, -1):
        tail += out[i]
        candidate = (tail - 1.0) / (k_classes - i)
        if candidate >= out[i - 1]:
            theta = candidate
            break
    if np.isnan(theta):
        theta = (tail + out[0] - 1.0) / k_classes
    for k in range(k_classes):
        out[k] = max(work[k] - theta, 0.0)


@njit(parallel=True, cache=True, error_model="numpy")
def _pgd_step_parallel(sigma: np.ndarray, y: np.ndarray, lam_eff: float, step_size: float, kind: int,
                       out: np.ndarray, work: np.ndarray) -> None:
    fairness = np.empty(sigma.shape[1])
    _fairness_gradient(y, lam_eff, kind, fairness)
    for i in prange(sigma.shape[0]):
        _pgd_row(sigma[i], y[i], fairness, step_size, kind, out[i], work[i])


@njit(cache=True, error_model="numpy")
def _pgd_step_serial(sigma: np.ndarray, y: np.ndarray, lam_eff: float, step_size: float, kind: int,
                     out: np.ndarray, work: np.ndarray) -> None:
    fairness = np.empty(sigma.shape[1])
    _fairness_gradient(y, lam_eff, kind, fairness)
    for i in range(sigma.shape[0]):
        _pgd_row(sigma[i], y[i], fairness, step_size, kind, out[i], work[i])


def pgd_step_numba(sigma: np.ndarray, y: np.ndarray, lam_eff: float, step_size: float, objective: PgdObjective,
                   out: np.ndarray, work: np.ndarray, threads: int) -> None:
    """One PGD iteration of the numba kernel into out (work: scratch of the same shape; neither aliases y)."""
    kind = OBJECTIVE_CODES[objective]
    if threads <= 1:
        _pgd_step_serial(sigma, y, lam_eff, step_size, kind, out, work)
    else:
        numba.set_num_threads(threads)
        _pgd_step_parallel(sigma, y, lam_eff, step_size, kind, out, work)
