"""EM solver for the collision self-labelling loss (11) (specs/collision_ce.md §3.4).

For fixed predictions σ (N×K, float64) it minimises over pseudo-labels y_i ∈ Δ_K

    F(y) = −(1/N) Σ_i ln σ_iᵀy_i − λ̃ Σ_k u_k ln ȳ_k.

E-step: Jensen's bound on −ln ȳ_k, tight at S_ik = y_ik / Σ_j y_jk, splits the fairness term over rows.
M-step, per row (multiplied by N): min_{y∈Δ} −ln σᵀy − Σ_k a_k ln y_k with a_k = λ̃ N u_k S_ik. The
simplex multiplier is β = 1 + A (A = Σ_k a_k), and with v = σᵀy

    y_k(v) = a_k v / ((1 + A) v − σ_k),   solve g(v) = Σ_k y_k(v) = 1,

where g is decreasing and convex right of its poles. Newton from v₀ = max_k σ_k / (1 + A − a_k), where
g(v₀) ≥ 1, increases monotonically to the unique root. Safeguards (each one was needed in stress tests):
y floored at 1e-30 before each E-step; denominators guarded by max(·, a_k v); classes with
a_k ≤ 1e-10·A completed by the supplementary's closed-form rule (v* = max(v_P, σ_m/(1+A)); Newton is
skipped when σ_m/(1+A) decides alone); Newton stopped at g − 1 ≤ 1e-12, on a stall or after 50 steps;
rows renormalised. Divisions follow IEEE rules (numba's error_model="numpy"), and a row whose weights are
so small (A ≲ 1e-290) that a_k·v underflows falls back to the arg-max vertex, its optimum to within A.

Two implementations of the same math: numba kernels (the production path; rows in parallel, the column
sums serial in a fixed order so the result does not depend on the thread count) and a vectorised NumPy
reference used by the tests. Neither modifies its inputs.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

Y_FLOOR = 1e-30
ZERO_SUPPORT_RTOL = 1e-10
NEWTON_TOL = 1e-12
NEWTON_MAX_ITERS = 50


# --------------------------------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------------------------------

def e_step_coefficients(y: np.ndarray, lam_eff: float) -> np.ndarray:
    """M-step coefficients a_ik = λ̃ N u_k y_ik / Σ_j y_jk, after flooring y at 1e-30 (a copy)."""
    floored = np.maximum(y, Y_FLOOR)
    n, k = floored.shape
    return (lam_eff * n / k) * floored / floored.sum(axis=0)


def newton_start(sigma: np.ndarray, a: np.ndarray) -> np.ndarray:
    """v₀ = max_{k∈P} σ_k / (1 + A − a_k) per row, P = {k : a_k > 1e-10·A}; 0 when P is empty."""
    total = a.sum(axis=1, keepdims=True)
    support = a > ZERO_SUPPORT_RTOL * total
    return np.where(support, sigma / (1.0 + total - a), 0.0).max(axis=1)


def labels_at(sigma: np.ndarray, a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """y_k(v) = a_k v / max((1 + A) v − σ_k, a_k v) on the support P, 0 elsewhere (not renormalised).

    The guard max(·, a_k v) caps each y_k at 1; it only binds at v₀ through round-off, where the exact
    denominator of the arg-max class is a difference of nearly equal numbers.
    """
    total = a.sum(axis=1, keepdims=True)
    support = a > ZERO_SUPPORT_RTOL * total
    v = v[:, None]
    denominator = np.maximum((1.0 + total) * v - sigma, a * v)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        values = a * v / denominator
    return np.where(support, values, 0.0)


def m_step_numpy(sigma: np.ndarray, a: np.ndarray,
                 trace: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve the M-step for every row, vectorised (all rows take Newton steps in lockstep, masked).

    Args:
        sigma: (N, K) predictions. a: (N, K) non-negative coefficients.
        trace: when given, the Newton iterate v of every row is appended after each step (v₀ first).

    Returns:
        y (N, K) on the simplex; Newton steps per row (int64); whether the row used the near-zero
        support completion rule (Z ≠ ∅).
    """
    n = sigma.shape[0]
    rows = np.arange(n)
    total = a.sum(axis=1, keepdims=True)
    one_plus = 1.0 + total
    support = a > ZERO_SUPPORT_RTOL * total
    a_support = np.where(support, a, 0.0)
    zero_support = ~support.all(axis=1)
    sigma_zero = np.where(support, -1.0, sigma)
    best_zero = sigma_zero.argmax(axis=1)
    completion_start = np.where(zero_support, sigma_zero[rows, best_zero] / one_plus[:, 0], 0.0)
    v = newton_start(sigma, a)
    if trace is not None:
        trace.append(v.copy())
    steps = np.zeros(n, dtype=np.int64)
    # No Newton where v_P cannot matter: v_P ≤ max_P σ_k, so when the completion point σ_m/(1+A) is at
    # least that, v* = σ_m/(1+A). This also covers rows whose supported σ are all 0 (g < 1 for all v > 0),
    # and it keeps Newton away from rows whose supported σ are so small that a_k·v underflows.
    supported_max = np.where(support, sigma, 0.0).max(axis=1)
    active = (v > 0) & ~(zero_support & (completion_start >= supported_max))
    for _ in range(NEWTON_MAX_ITERS):
        if not active.any():
            break
        vv = v[:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            denominator = np.where(support, np.maximum(one_plus * vv - sigma, a_support * vv), 1.0)
            term = a_support / denominator
            residual = (term * vv).sum(axis=1) - 1.0
            slope = -(term * sigma / denominator).sum(axis=1)
            proposal = v - residual / slope
        # A step that does not increase v is a round-off stall: the root is reached to machine precision.
        moving = active & (residual > NEWTON_TOL) & (proposal > v)
        v = np.where(moving, proposal, v)
        steps += moving
        active = moving
        if trace is not None:
            trace.append(v.copy())
    # Completion rule: if the optimum on P alone is too small for some zero-support class m (the one with
    # the largest σ), KKT puts v* = σ_m/(1+A) and the remaining mass on m.
    v = np.where(zero_support, np.maximum(v, completion_start), v)
    y = labels_at(sigma, a, v)
    remainder = np.maximum(0.0, 1.0 - y.sum(axis=1))
    y[rows[zero_support], best_zero[zero_support]] = remainder[zero_support]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mass = y.sum(axis=1, keepdims=True)
        y /= mass
    # Last resort for a total weight A so small (≲ 1e-290) that a_k·v underflows: the optimum is then the
    # vertex at argmax σ to within A, which is what this returns instead of NaN.
    broken = ~np.isfinite(y).all(axis=1) | ~(mass[:, 0] > 0)
    if broken.any():
        y[broken] = 0.0
        y[rows[broken], sigma[broken].argmax(axis=1)] = 1.0
    return y, steps, zero_support


def em_step_numpy(sigma: np.ndarray, y: np.ndarray, lam_eff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One EM iteration (E-step then M-step) of the NumPy reference; returns (y_new, newton steps, Z ≠ ∅)."""
    return m_step_numpy(sigma, e_step_coefficients(y, lam_eff))


# --------------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _m_step_row(sigma: np.ndarray, a: np.ndarray, trace: np.ndarray, record: bool) -> tuple[int, bool]:
    """M-step for one row, in place: a (the coefficients) is overwritten by y.

    Reading a_k and writing y_k at the same index in the final pass is safe: a_k is not needed after
    its own y_k is written. Returns (Newton steps, Z ≠ ∅). With record, trace[t] holds the t-th iterate.
    """
    k_classes = sigma.shape[0]
    total = 0.0
    for k in range(k_classes):
        total += a[k]
    threshold = ZERO_SUPPORT_RTOL * total
    one_plus = 1.0 + total
    v = 0.0
    has_zero = False
    best_zero = -1
    best_zero_sigma = -1.0
    for k in range(k_classes):
        if a[k] > threshold:
            start = sigma[k] / (one_plus - a[k])
            if start > v:
                v = start
        else:
            has_zero = True
            if sigma[k] > best_zero_sigma:
                best_zero_sigma = sigma[k]
                best_zero = k
    if record:
        trace[0] = v
    steps = 0
    # Skip Newton where v_P cannot matter (see m_step_numpy): v_P ≤ max_P σ_k ≤ σ_m/(1+A).
    run_newton = v > 0.0
    if has_zero:
        supported_max = 0.0
        for k in range(k_classes):
            if a[k] > threshold and sigma[k] > supported_max:
                supported_max = sigma[k]
        if best_zero_sigma / one_plus >= supported_max:
            run_newton = False
    if run_newton:
        while steps < NEWTON_MAX_ITERS:
            g = 0.0
            slope = 0.0
            for k in range(k_classes):
                if a[k] > threshold:
                    # One division per class: it dominates the cost of the M-step.
                    inverse = 1.0 / max(one_plus * v - sigma[k], a[k] * v)
                    term = a[k] * inverse
                    g += term * v
                    slope -= term * sigma[k] * inverse
            residual = g - 1.0
            if residual <= NEWTON_TOL:
                break
            proposal = v - residual / slope
            if not proposal > v:
                break
            v = proposal
            steps += 1
            if record:
                trace[steps] = v
    if has_zero:
        v = max(v, best_zero_sigma / one_plus)
    mass = 0.0
    for k in range(k_classes):
        if a[k] > threshold:
            a[k] = a[k] * v / max(one_plus * v - sigma[k], a[k] * v)
            mass += a[k]
        else:
            a[k] = 0.0
    if has_zero:
        a[best_zero] = max(0.0, 1.0 - mass)
        mass += a[best_zero]
    if mass > 0.0 and mass < np.inf:
        for k in range(k_classes):
            a[k] /= mass
    else:
        # A total weight so small that a_k·v underflows: the optimum is the arg-max vertex to within A.
        top = 0
        for k in range(k_classes):
            a[k] = 0.0
            if sigma[k] > sigma[top]:
                top = k
        a[top] = 1.0
    return steps, has_zero


@njit(cache=True, error_model="numpy")
def _e_step_scale(y: np.ndarray, lam_eff: float, scale: np.ndarray) -> None:
    # Serial, fixed-order column sums: the only cross-row reduction, kept out of prange so the result is
    # bit-identical for any thread count.
    n, k_classes = y.shape
    for k in range(k_classes):
        scale[k] = 0.0
    for i in range(n):
        for k in range(k_classes):
            scale[k] += max(y[i, k], Y_FLOOR)
    factor = lam_eff * n / k_classes
    for k in range(k_classes):
        scale[k] = factor / scale[k]


@njit(parallel=True, cache=True, error_model="numpy")
def _em_step_parallel(sigma: np.ndarray, y: np.ndarray, lam_eff: float, out: np.ndarray,
                      steps: np.ndarray, zero_support: np.ndarray) -> None:
    n, k_classes = sigma.shape
    scale = np.empty(k_classes)
    _e_step_scale(y, lam_eff, scale)
    unused = np.empty(1)
    for i in prange(n):
        for k in range(k_classes):
            out[i, k] = max(y[i, k], Y_FLOOR) * scale[k]
        s, z = _m_step_row(sigma[i], out[i], unused, False)
        steps[i] = s
        zero_support[i] = z


@njit(cache=True, error_model="numpy")
def _em_step_serial(sigma: np.ndarray, y: np.ndarray, lam_eff: float, out: np.ndarray,
                    steps: np.ndarray, zero_support: np.ndarray) -> None:
    # Same loop without prange: with one solver thread numba's worker pool is never started at all.
    n, k_classes = sigma.shape
    scale = np.empty(k_classes)
    _e_step_scale(y, lam_eff, scale)
    unused = np.empty(1)
    for i in range(n):
        for k in range(k_classes):
            out[i, k] = max(y[i, k], Y_FLOOR) * scale[k]
        s, z = _m_step_row(sigma[i], out[i], unused, False)
        steps[i] = s
        zero_support[i] = z


@njit(cache=True, error_model="numpy")
def _m_step_rows(sigma: np.ndarray, a: np.ndarray, out: np.ndarray, steps: np.ndarray,
                 zero_support: np.ndarray, trace: np.ndarray, record: bool) -> None:
    for i in range(sigma.shape[0]):
        for k in range(sigma.shape[1]):
            out[i, k] = a[i, k]
        s, z = _m_step_row(sigma[i], out[i], trace[i], record)
        steps[i] = s
        zero_support[i] = z


def m_step_numba(sigma: np.ndarray, a: np.ndarray,
                 trace: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The numba M-step on every row (serial; for tests and diagnostics).

    Returns y, Newton steps, Z ≠ ∅ per row and, with trace, an (N, 51) array of iterates (v₀ first,
    NaN after the last step).
    """
    sigma = np.ascontiguousarray(sigma, dtype=np.float64)
    a = np.ascontiguousarray(a, dtype=np.float64)
    n = sigma.shape[0]
    out = np.empty_like(sigma)
    steps = np.zeros(n, dtype=np.int64)
    zero_support = np.zeros(n, dtype=np.bool_)
    iterates = np.full((n, NEWTON_MAX_ITERS + 1) if trace else (n, 1), np.nan)
    _m_step_rows(sigma, a, out, steps, zero_support, iterates, trace)
    return out, steps, zero_support, iterates if trace else None


def em_step_numba(sigma: np.ndarray, y: np.ndarray, lam_eff: float, out: np.ndarray, steps: np.ndarray,
                  zero_support: np.ndarray, threads: int) -> None:
    """One EM iteration of the numba kernel into the preallocated out/steps/zero_support buffers.

    sigma, y, out: C-contiguous float64 (N, K); out must not alias y. threads = 1 runs the serial kernel.
    """
    if threads <= 1:
        _em_step_serial(sigma, y, lam_eff, out, steps, zero_support)
    else:
        # numba's thread count is thread-local: set it in the calling thread, every call.
        numba.set_num_threads(threads)
        _em_step_parallel(sigma, y, lam_eff, out, steps, zero_support)
