"""Pseudo-label solvers for collision-CE self-labelled clustering (specs/collision_ce.md §3.4–3.5).

``solve_pseudo_labels`` minimises a self-labelling objective over soft labels y ∈ Δ_Kᴺ for fixed
float64 predictions σ: the EM of §3.4 on loss (11), projected gradient descent on (11), (10) or (5), or
the argmax switch. Inputs are validated (a ``SolverInputError`` names the problem and the fix, the
solver never returns NaN from bad input) and never modified in place.

Threads: the numba kernels use at most ``set_solver_threads(n)`` threads; with n = 1 a serial kernel
runs and numba's worker pool is never started. On a machine shared with torch's intra-op pool keep
n small (spec pitfall P4).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np

from ssl_lightning.losses.collision import self_labelling_objective
from ssl_lightning.solvers.collision_em import em_step_numba, em_step_numpy
from ssl_lightning.solvers.pgd import default_step_size, pgd_step_numba, pgd_step_numpy, project_simplex

Solver = Literal["em", "pgd", "argmax"]
Objective = Literal["collision", "collision_fwd", "miadm"]
Backend = Literal["numba", "numpy"]

ROW_SUM_ATOL = 1e-6

__all__ = [
    "SolverInputError",
    "SolverStats",
    "project_simplex",
    "self_labelling_objective",
    "set_solver_threads",
    "solve_pseudo_labels",
    "solver_threads",
    "warm_up_solver",
]


@dataclass(frozen=True)
class SolverStats:
    """Diagnostics of one solve.

    iterations: EM or PGD iterations run (0 for argmax). objective: F(y) at the returned y.
    newton_mean / newton_max: Newton steps per M-step row, over all rows and EM iterations (0 for
    PGD and argmax). zero_support_rows: rows whose last M-step used the near-zero-support completion
    rule. wall_ms: wall time of the whole call, validation included.
    """

    iterations: int
    objective: float
    newton_mean: float
    newton_max: int
    zero_support_rows: int
    wall_ms: float


class SolverInputError(ValueError):
    """Invalid solver input; the message says what is wrong and how to fix it."""


_threads: int = max(1, min(8, numba.config.NUMBA_NUM_THREADS))


def set_solver_threads(n: int) -> None:
    """Use at most n threads in the numba kernels (clamped to [1, numba.config.NUMBA_NUM_THREADS]).

    n = 1 selects the serial kernels, which never start numba's worker pool.
    """
    global _threads
    _threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    if _threads > 1:
        numba.set_num_threads(_threads)


def solver_threads() -> int:
    """The thread budget set by ``set_solver_threads`` (default min(8, numba's maximum))."""
    return _threads


def warm_up_solver() -> None:
    """Compile (or load from numba's on-disk cache) the kernels the current thread budget uses."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 3))
    sigma = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    solve_pseudo_labels(sigma, 1.0, solver="em", iters=2)
    solve_pseudo_labels(sigma, 1.0, solver="pgd", iters=1)


def _validated_rows(values: np.ndarray, name: str) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64, order="C", copy=True)
    except (TypeError, ValueError) as error:
        raise SolverInputError(f"{name} must be convertible to a float64 array: {error}") from error
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise SolverInputError(f"{name} must be a 2-D (N, K) array with N, K >= 1, got shape {array.shape}; "
                               "pass one row of class probabilities per sample")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise SolverInputError(f"{name} has non-finite entries (NaN or inf) in {bad} row(s); check the logits "
                               "for overflow and compute the softmax in float64")
    if (array < 0).any():
        raise SolverInputError(f"{name} has negative entries (min {array.min():.3g}); pass probabilities "
                               "(softmax outputs), not logits")
    sums = array.sum(axis=1)
    worst = float(np.abs(sums - 1.0).max())
    if worst > ROW_SUM_ATOL:
        raise SolverInputError(f"{name} rows must sum to 1 within {ROW_SUM_ATOL:g}; the worst row is off by "
                               f"{worst:.3g}; apply softmax over the class dimension (dim=1) in float64")
    return array


def _validated_scalar(value: float, name: str, low: float, low_open: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number) or number < low or (low_open and number == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise SolverInputError(f"{name} must be finite and {bound}, got {value!r}")
    return number


def solve_pseudo_labels(
    sigma: np.ndarray,
    lam_eff: float,
    *,
    solver: Solver = "em",
    objective: Objective = "collision",
    iters: int = 5,
    tol: float = 0.0,
    step_size: float | None = None,
    backend: Backend = "numba",
    y_init: np.ndarray | None = None,
) -> tuple[np.ndarray, SolverStats]:
    """Soft pseudo-labels y minimising the self-labelling objective for fixed predictions σ.

    Args:
        sigma: (N, K) predictions, rows on the simplex (float64 is used internally; not modified).
        lam_eff: the effective fairness weight λ̃ ≥ 0.
        solver: "em" (loss (11) only), "pgd" or "argmax" (y = one-hot(argmax σ)).
        objective: "collision" (11), "collision_fwd" (10) or "miadm" (5).
        iters: maximum number of EM / PGD iterations (≥ 1).
        tol: when > 0, stop once F(y_prev) − F(y) ≤ tol·max(1, |F(y)|) (for PGD, which is not monotone,
            once |F(y_prev) − F(y)| is that small). 0 runs exactly ``iters`` iterations.
        step_size: PGD step η; default 0.1 / (1 + λ̃).
        backend: "numba" (production) or "numpy" (the vectorised reference).
        y_init: starting labels (N, K); default y⁰ = σ.

    Returns:
        y (N, K) float64 with rows on the simplex, and its ``SolverStats``.

    Raises:
        SolverInputError: on malformed σ or y_init, a negative or non-finite λ̃, EM requested for an
            objective other than "collision", iters < 1, a negative tol or a non-positive step size.
    """
    started = time.perf_counter()
    probs = _validated_rows(sigma, "sigma")
    lam = _validated_scalar(lam_eff, "lam_eff", 0.0)
    tolerance = _validated_scalar(tol, "tol", 0.0)
    if solver not in ("em", "pgd", "argmax"):
        raise SolverInputError(f"solver must be 'em', 'pgd' or 'argmax', got {solver!r}")
    if objective not in ("collision", "collision_fwd", "miadm"):
        raise SolverInputError(f"objective must be 'collision', 'collision_fwd' or 'miadm', got {objective!r}")
    if solver == "em" and objective != "collision":
        raise SolverInputError(f"the EM solver only minimises loss (11) (objective='collision'); use solver='pgd' "
                               f"for objective={objective!r}")
    if backend not in ("numba", "numpy"):
        raise SolverInputError(f"backend must be 'numba' or 'numpy', got {backend!r}")
    if isinstance(iters, bool) or int(iters) != iters or iters < 1:
        raise SolverInputError(f"iters must be an integer >= 1, got {iters!r}")
    eta = default_step_size(lam) if step_size is None else _validated_scalar(step_size, "step_size", 0.0, True)

    def finish(y: np.ndarray, iterations: int, newton_total: int, newton_max: int, zero_rows: int,
               value: float | None = None) -> tuple[np.ndarray, SolverStats]:
        rows_solved = iterations * probs.shape[0]
        stats = SolverStats(
            iterations=iterations,
            objective=self_labelling_objective(probs, y, lam, objective) if value is None else value,
            newton_mean=newton_total / rows_solved if solver == "em" and rows_solved else 0.0,
            newton_max=newton_max,
            zero_support_rows=zero_rows,
            wall_ms=(time.perf_counter() - started) * 1e3,
        )
        return y, stats

    if solver == "argmax":
        hard = np.zeros_like(probs)
        hard[np.arange(probs.shape[0]), probs.argmax(axis=1)] = 1.0
        return finish(hard, 0, 0, 0, 0)

    y = probs.copy() if y_init is None else _validated_rows(y_init, "y_init")
    if y.shape != probs.shape:
        raise SolverInputError(f"y_init must have the shape of sigma {probs.shape}, got {y.shape}")
    step = make_stepper(probs, lam, solver, objective, eta, backend)
    value = self_labelling_objective(probs, y, lam, objective) if tolerance > 0 else None
    newton_total = newton_max = zero_rows = iterations = 0
    for _ in range(int(iters)):
        y, newton_steps, zero_support = step(y)
        iterations += 1
        if newton_steps is not None:
            newton_total += int(newton_steps.sum())
            newton_max = max(newton_max, int(newton_steps.max()))
            zero_rows = int(zero_support.sum())
        if tolerance > 0:
            previous, value = value, self_labelling_objective(probs, y, lam, objective)
            change = previous - value if solver == "em" else abs(previous - value)
            if change <= tolerance * max(1.0, abs(value)):
                break
    return finish(y, iterations, newton_total, newton_max, zero_rows, value)


Step = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


def make_stepper(sigma: np.ndarray, lam_eff: float, solver: Solver, objective: Objective, step_size: float,
             backend: Backend) -> Step:
    """One solver iteration y ↦ (y_new, Newton steps per row or None, Z ≠ ∅ per row or None).

    The numba steppers ping-pong between two buffers (plus PGD's scratch); the array returned by one
    call is the input of the next and is overwritten two calls later, so callers keep a copy if needed.
    """
    if backend == "numpy":
        if solver == "em":
            return lambda y: em_step_numpy(sigma, y, lam_eff)
        return lambda y: (pgd_step_numpy(sigma, y, lam_eff, step_size, objective), None, None)

    buffers = [np.empty_like(sigma), np.empty_like(sigma)]
    threads = _threads
    if solver == "em":
        steps = np.zeros(sigma.shape[0], dtype=np.int64)
        zero_support = np.zeros(sigma.shape[0], dtype=np.bool_)

        def em(y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            out = buffers[0] if buffers[0] is not y else buffers[1]
            em_step_numba(sigma, y, lam_eff, out, steps, zero_support, threads)
            return out, steps, zero_support

        return em

    work = np.empty_like(sigma)

    def pgd(y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        out = buffers[0] if buffers[0] is not y else buffers[1]
        pgd_step_numba(sigma, y, lam_eff, step_size, objective, out, work, threads)
        return out, None, None

    return pgd
