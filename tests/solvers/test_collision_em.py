"""The y-step solvers: EM on loss (11), PGD, argmax, validation and the benchmark table.

specs/collision_ce.md §8 tests 8–17 (and the argmax half of 18): every EM test runs on the numba kernel
and on the NumPy reference, except the two long runs (5,000 and 20,000 iterations), which use numba.
The numba kernels run on one thread here (the serial kernel) except in the determinism test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numba
import numpy as np
import pytest
from scipy.optimize import minimize

from ssl_lightning.solvers import (
    SolverInputError,
    project_simplex,
    self_labelling_objective,
    set_solver_threads,
    solve_pseudo_labels,
    solver_threads,
)
from ssl_lightning.solvers.benchmark import COLUMNS, solver_table, tolerance
from ssl_lightning.solvers.collision_em import labels_at, m_step_numba, m_step_numpy, newton_start
from ssl_lightning.solvers.pgd import objective_gradient, pgd_step_numpy

BACKENDS = ["numba", "numpy"]


@pytest.fixture(autouse=True, scope="module")
def _one_solver_thread() -> Iterator[None]:
    previous = solver_threads()
    set_solver_threads(1)
    yield
    set_solver_threads(previous)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _predictions(n: int, k: int, seed: int, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _softmax(scale * rng.standard_normal((n, k)) + np.linspace(0.0, 2.0, k))


def _kkt_residual(sigma: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """G − c with G_ik = −σ_ik/σ_iᵀy_i − λ̃u_k/ȳ_k and c_i = −(1 + λ̃ Σ_k u_k y_ik/ȳ_k) = Σ_k y_ik G_ik."""
    k = sigma.shape[1]
    mean = y.mean(axis=0)
    grad = -sigma / (sigma * y).sum(1, keepdims=True) - lam / (k * mean)
    constant = -(1.0 + lam * (y / (k * mean)).sum(1, keepdims=True))
    return grad - constant


def _m_step(backend: str, sigma: np.ndarray, a: np.ndarray) -> np.ndarray:
    return m_step_numpy(sigma, a)[0] if backend == "numpy" else m_step_numba(sigma, a)[0]


# ---------------------------------------------------------------------------------------------- test 8
@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_case_in_one_iteration(backend: str) -> None:
    sigma = np.array([[0.8, 0.2]])
    y, stats = solve_pseudo_labels(sigma, 1.0, iters=1, backend=backend)  # type: ignore[arg-type]
    np.testing.assert_allclose(y, [[0.7020357, 0.2979643]], atol=1e-7)
    assert float((sigma * y).sum()) == pytest.approx((1.5 + math.sqrt(0.97)) / 4, abs=1e-12)
    assert (1.5 + math.sqrt(0.97)) / 4 == pytest.approx(0.6212214, abs=1e-7)
    assert stats.iterations == 1 and stats.newton_max >= 1
    # With N = 1 Jensen's bound is exact: the first M-step is already the optimum.
    again, _ = solve_pseudo_labels(sigma, 1.0, iters=1, backend=backend, y_init=y)  # type: ignore[arg-type]
    np.testing.assert_allclose(again, y, atol=1e-12)


# ---------------------------------------------------------------------------------------------- test 9
def test_newton_start_point_and_monotone_iterates() -> None:
    rng = np.random.default_rng(9)
    sigma = _predictions(200, 7, seed=9)
    a = rng.gamma(0.5, 1.0, size=sigma.shape) * rng.choice([1e-3, 1.0, 50.0], size=(200, 1))
    v0 = newton_start(sigma, a)
    y0 = labels_at(sigma, a, v0)
    assert (y0 <= 1.0 + 1e-12).all()
    top = (sigma / (1.0 + a.sum(1, keepdims=True) - a)).argmax(1)
    np.testing.assert_allclose(y0[np.arange(200), top], 1.0, atol=1e-12)
    assert (y0.sum(1) >= 1.0 - 1e-12).all()

    trace: list[np.ndarray] = []
    y_numpy, steps, _ = m_step_numpy(sigma, a, trace)
    iterates = np.stack(trace)
    assert (np.diff(iterates, axis=0) >= 0).all()
    assert (iterates <= sigma.max(1) + 1e-15).all()
    assert steps.max() <= 50 and steps.mean() < 15
    # v* = σᵀy up to the final renormalisation (a Newton stall near a pole leaves g − 1 ≈ 1e-10).
    np.testing.assert_allclose((sigma * y_numpy).sum(1), iterates[-1], rtol=1e-9)

    y_numba, steps_numba, _, numba_trace = m_step_numba(sigma, a, trace=True)
    assert numba_trace is not None
    for row, count in enumerate(steps_numba):
        path = numba_trace[row, : count + 1]
        assert (np.diff(path) > 0).all() and path[-1] <= sigma[row].max()
        assert path[0] == pytest.approx(v0[row], rel=1e-15)
    np.testing.assert_allclose(y_numba, y_numpy, atol=1e-12)


# --------------------------------------------------------------------------------------------- test 10
def _m_step_objective(sigma: np.ndarray, a: np.ndarray, y: np.ndarray) -> float:
    support = a > 0
    with np.errstate(divide="ignore"):
        return float(-np.log(sigma @ y) - (a[support] * np.log(y[support])).sum())


def _brute_force(sigma: np.ndarray, a: np.ndarray, rng: np.random.Generator) -> float:
    """min over y = softmax(θ) by BFGS from 5 random starts (the simplex boundary is reached as θ → −∞)."""
    support = a > 0

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        y = np.exp(theta - theta.max())
        y /= y.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            dy = -sigma / (sigma @ y) - np.where(support, a / y, 0.0)
            return _m_step_objective(sigma, a, y), y * (dy - y @ dy)

    best = math.inf
    for _ in range(5):
        result = minimize(value_and_grad, 2 * rng.standard_normal(len(sigma)), jac=True, method="BFGS",
                          options={"gtol": 1e-13, "maxiter": 2000})
        best = min(best, float(result.fun))
    return best


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["random_zeros", "tiny_coefficient"])
def test_zero_support_matches_brute_force(backend: str, case: str) -> None:
    rng = np.random.default_rng(10)
    sigma = _predictions(8, 5, seed=10, scale=1.5)
    a = rng.gamma(1.0, 0.3, size=sigma.shape)
    if case == "random_zeros":
        a[rng.random(a.shape) < 0.4] = 0.0
        a[:2, :] = 0.0  # rows with an empty support: y = vertex at argmax σ
        a[2, sigma[2].argmax()] = 0.0  # the largest σ outside the support: the completion rule must fire
        a[3:, 0] = np.maximum(a[3:, 0], 0.05)
    else:
        a[np.arange(8), sigma.argmax(1)] *= 1e-14
    y = _m_step(backend, sigma, a)
    used_completion = 0
    for row in range(8):
        # The brute force minimises the limit problem a_k → 0; a·1e-14 changes the optimum by ~1e-14.
        exact_a = np.where(a[row] > 1e-10 * a[row].sum(), a[row], 0.0)
        assert _m_step_objective(sigma[row], exact_a, y[row]) == pytest.approx(
            _brute_force(sigma[row], exact_a, rng), abs=1e-7)
        used_completion += int(y[row][exact_a == 0].max(initial=0.0) > 1e-3)
    assert used_completion >= 2
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-12)


# --------------------------------------------------------------------------------------------- test 11
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_predictions(backend: str) -> None:
    sigma = np.full((7, 4), 0.25)
    y, stats = solve_pseudo_labels(sigma, 2.0, iters=10, backend=backend)  # type: ignore[arg-type]
    np.testing.assert_allclose(y, 0.25, atol=1e-15)
    # F = ln K + λ̃ KL(u‖ȳ) = ln K; the implementation drops the constant −λ̃ ln K of (11), hence (1+λ̃) ln K.
    assert stats.objective == pytest.approx(3 * math.log(4), abs=1e-14)


# --------------------------------------------------------------------------------------------- test 12
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_fairness_gives_argmax_vertices(backend: str) -> None:
    sigma = _predictions(300, 10, seed=12)
    y, _ = solve_pseudo_labels(sigma, 1e-6, iters=5, backend=backend)  # type: ignore[arg-type]
    assert y.max(1).min() >= 0.999
    np.testing.assert_array_equal(y.argmax(1), sigma.argmax(1))


def test_strong_fairness_balances_the_clusters() -> None:
    sigma = _predictions(512, 10, seed=12)
    assert np.abs(sigma.mean(0) - 0.1).max() > 0.05  # the tilt makes σ̄ clearly unbalanced
    y, stats = solve_pseudo_labels(sigma, 100.0, iters=5000)
    assert stats.iterations == 5000
    assert np.abs(y.mean(0) - 0.1).max() < 2e-3


# --------------------------------------------------------------------------------------------- test 13
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.4, 1.0, 100.0])
def test_objective_never_increases(backend: str, lam: float) -> None:
    sigma = _predictions(100, 8, seed=13)
    y = sigma
    values = [self_labelling_objective(sigma, y, lam, "collision")]
    for _ in range(60):
        y, stats = solve_pseudo_labels(sigma, lam, iters=1, backend=backend, y_init=y)  # type: ignore[arg-type]
        values.append(stats.objective)
    increases = np.diff(values)
    assert (increases <= 1e-12 * max(1.0, abs(values[0]))).all()
    assert values[-1] < values[0] - 1e-3


# --------------------------------------------------------------------------------------------- test 14
@pytest.mark.parametrize("backend", BACKENDS)
def test_kkt_two_classes_interior(backend: str) -> None:
    # Interior optima need similar rows: KKT asks (σ_i1 − σ_i2)/σ_iᵀy_i to be one constant for every
    # interior row, so widely spread predictions put most rows on vertices.
    p = np.random.default_rng(14).uniform(0.6, 0.62, size=40)
    sigma = np.stack([p, 1 - p], axis=1)
    y, _ = solve_pseudo_labels(sigma, 1.0, iters=3000, backend=backend)  # type: ignore[arg-type]
    assert y.min() > 0.1  # an interior solution
    assert np.abs(_kkt_residual(sigma, y, 1.0)).max() < 1e-8


def test_kkt_ten_classes_after_long_run() -> None:
    sigma = _predictions(60, 10, seed=14)
    y, _ = solve_pseudo_labels(sigma, 1.0, iters=20_000)
    residual = _kkt_residual(sigma, y, 1.0)
    supported = y > 1e-2
    assert supported.sum() > 60 and (~supported).sum() > 60  # both cases are exercised
    assert np.abs(residual[supported]).max() < 1e-4
    assert residual[~supported].min() > -1e-4


# --------------------------------------------------------------------------------------------- test 15
@pytest.mark.parametrize("k", [2, 10])
def test_em_agrees_with_long_small_step_pgd(k: int) -> None:
    sigma = _predictions(50, k, seed=15, scale=1.5)
    _, em = solve_pseudo_labels(sigma, 1.0, iters=3000)
    _, pgd = solve_pseudo_labels(sigma, 1.0, solver="pgd", iters=8000, step_size=0.05)
    assert em.objective == pytest.approx(pgd.objective, abs=1e-6)
    assert em.objective <= pgd.objective + 1e-9


# --------------------------------------------------------------------------------------------- test 16
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["em", "pgd"])
def test_equivariance_invariants_and_untouched_inputs(backend: str, solver: str) -> None:
    rng = np.random.default_rng(16)
    sigma = _predictions(30, 6, seed=16)
    start = _predictions(30, 6, seed=17)
    sigma_copy, start_copy = sigma.copy(), start.copy()
    kwargs = {"solver": solver, "iters": 25, "backend": backend}
    y, _ = solve_pseudo_labels(sigma, 3.0, y_init=start, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(sigma, sigma_copy)
    np.testing.assert_array_equal(start, start_copy)
    assert not np.shares_memory(y, sigma) and not np.shares_memory(y, start)
    assert (y >= 0).all()
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-12)

    rows = rng.permutation(30)
    permuted_rows, _ = solve_pseudo_labels(sigma[rows], 3.0, y_init=start[rows], **kwargs)  # type: ignore[arg-type]
    np.testing.assert_allclose(permuted_rows, y[rows], atol=1e-12)
    classes = rng.permutation(6)
    permuted_classes, _ = solve_pseudo_labels(sigma[:, classes], 3.0, y_init=start[:, classes],
                                              **kwargs)  # type: ignore[arg-type]
    np.testing.assert_allclose(permuted_classes, y[:, classes], atol=1e-12)


# --------------------------------------------------------------------------------------------- test 17
def test_labels_do_not_depend_on_rank_count_or_threads() -> None:
    rng = np.random.default_rng(17)
    logits = 3.0 * rng.standard_normal((48, 6))
    results = []
    for world in (1, 2, 4):
        local = np.split(logits, world)  # each rank's logits
        gathered = np.concatenate(local)  # all_gather, rank-major
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            set_solver_threads(threads)
            y, _ = solve_pseudo_labels(_softmax(gathered), 100.0, iters=5)
            # rank r keeps rows r·B/W … (r+1)·B/W of the broadcast y
            results.append(np.concatenate([part for part in np.split(y, world)]))
    set_solver_threads(1)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


# --------------------------------------------------------------------------------------------- test 18
@pytest.mark.parametrize("objective", ["collision", "collision_fwd", "miadm"])
def test_argmax_switch(objective: str) -> None:
    sigma = _predictions(20, 5, seed=18)
    y, stats = solve_pseudo_labels(sigma, 1.0, solver="argmax", objective=objective)  # type: ignore[arg-type]
    np.testing.assert_array_equal(y, np.eye(5)[sigma.argmax(1)])
    assert stats.objective == pytest.approx(self_labelling_objective(sigma, y, 1.0, objective))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- PGD
def test_simplex_projection_is_the_euclidean_projection() -> None:
    rng = np.random.default_rng(19)
    x = rng.normal(size=(200, 7)) * rng.choice([0.1, 1.0, 10.0], size=(200, 1))
    p = project_simplex(x)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    # Variational inequality: (x − p)ᵀ(q − p) ≤ 0 for every q in the simplex, i.e. for every vertex.
    assert (((x - p)[:, :, None] * (np.eye(7)[None] - p[:, :, None])).sum(1) <= 1e-12).all()
    np.testing.assert_allclose(project_simplex(p), p, atol=1e-15)


@pytest.mark.parametrize("objective", ["collision", "collision_fwd", "miadm"])
def test_pgd_kernels_agree_and_descend(objective: str) -> None:
    sigma = _predictions(80, 6, seed=20)
    sigma[0, 0] = 0.0  # an exact zero: MIADM's −ln σ must stay finite
    sigma /= sigma.sum(1, keepdims=True)
    y_numba, numba_stats = solve_pseudo_labels(sigma, 1.0, solver="pgd", objective=objective,  # type: ignore[arg-type]
                                               iters=30)
    y_numpy, numpy_stats = solve_pseudo_labels(sigma, 1.0, solver="pgd", objective=objective,  # type: ignore[arg-type]
                                               iters=30, backend="numpy")
    np.testing.assert_allclose(y_numba, y_numpy, atol=1e-12)
    assert numba_stats.newton_mean == 0.0 and numba_stats.iterations == 30
    # Small steps decrease a convex objective monotonically and approach its optimum (Frank–Wolfe gap).
    y = sigma
    values = [self_labelling_objective(sigma, y, 1.0, objective)]  # type: ignore[arg-type]
    for _ in range(400):
        y = pgd_step_numpy(sigma, y, 1.0, 0.05, objective)  # type: ignore[arg-type]
        values.append(self_labelling_objective(sigma, y, 1.0, objective))  # type: ignore[arg-type]
    assert (np.diff(values) <= 1e-12).all()
    g = objective_gradient(sigma, y, 1.0, objective)  # type: ignore[arg-type]
    assert float(((g * y).sum(1) - g.min(1)).mean()) < 1e-3


# ---------------------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("solver", ["em", "pgd"])
@pytest.mark.parametrize("lam", [0.0, 1e-300, 1e-12, 1.0, 1e9])
def test_extreme_inputs_stay_on_the_simplex(solver: str, lam: float) -> None:
    rng = np.random.default_rng(22)
    sigma = _softmax(740.0 * rng.standard_normal((12, 6)))  # exact zeros and subnormal entries
    sigma[0] = np.eye(6)[0]
    start = np.eye(6)[(sigma.argmax(1) + 1) % 6]  # a face where σᵀy = 0: F = inf, the gradient is huge
    results = []
    for backend in BACKENDS:
        y, _ = solve_pseudo_labels(sigma, lam, solver=solver, iters=4, y_init=start,  # type: ignore[arg-type]
                                   backend=backend)  # type: ignore[arg-type]
        assert np.isfinite(y).all() and (y >= 0).all()
        np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-12)
        results.append(y)
    np.testing.assert_allclose(results[0], results[1], atol=1e-9)


# ------------------------------------------------------------------------------ stopping and stats
@pytest.mark.parametrize("backend", BACKENDS)
def test_tolerance_stops_when_progress_is_small(backend: str) -> None:
    sigma = _predictions(100, 8, seed=21)
    y, stats = solve_pseudo_labels(sigma, 0.4, iters=5000, tol=1e-9, backend=backend)  # type: ignore[arg-type]
    assert 5 < stats.iterations < 5000
    _, before = solve_pseudo_labels(sigma, 0.4, iters=stats.iterations - 1, backend=backend)  # type: ignore[arg-type]
    assert 0 <= before.objective - stats.objective <= 1e-9 * max(1.0, abs(stats.objective))
    assert stats.objective == pytest.approx(self_labelling_objective(sigma, y, 0.4, "collision"), abs=1e-15)
    assert 0 < stats.newton_mean <= stats.newton_max <= 50 and stats.wall_ms > 0


def test_thread_budget_is_clamped() -> None:
    set_solver_threads(10_000)
    assert solver_threads() == numba.config.NUMBA_NUM_THREADS
    set_solver_threads(0)
    assert solver_threads() == 1


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("sigma", "kwargs", "message"),
    [
        (np.array([0.5, 0.5]), {}, "2-D"),
        (np.array([[0.5, np.nan]]), {}, "non-finite"),
        (np.array([[np.inf, 0.5]]), {}, "non-finite"),
        (np.array([[1.5, -0.5]]), {}, "negative"),
        (np.array([[0.5, 0.6]]), {}, "sum to 1"),
        (np.array([[0.5, 0.5]]), {"lam_eff": -1.0}, "lam_eff"),
        (np.array([[0.5, 0.5]]), {"lam_eff": math.nan}, "lam_eff"),
        (np.array([[0.5, 0.5]]), {"objective": "collision_fwd"}, "solver='pgd'"),
        (np.array([[0.5, 0.5]]), {"objective": "miadm"}, "only minimises loss"),
        (np.array([[0.5, 0.5]]), {"iters": 0}, "iters"),
        (np.array([[0.5, 0.5]]), {"iters": 2.5}, "iters"),
        (np.array([[0.5, 0.5]]), {"tol": -1.0}, "tol"),
        (np.array([[0.5, 0.5]]), {"solver": "pgd", "step_size": 0.0}, "step_size"),
        (np.array([[0.5, 0.5]]), {"solver": "sinkhorn"}, "solver"),
        (np.array([[0.5, 0.5]]), {"backend": "cuda"}, "backend"),
        (np.array([[0.5, 0.5]]), {"y_init": np.array([[1.0, 0.0], [0.0, 1.0]])}, "shape of sigma"),
        (np.array([[0.5, 0.5]]), {"y_init": np.array([[1.2, -0.2]])}, "y_init has negative"),
    ],
)
def test_invalid_inputs_raise_clear_errors(sigma: np.ndarray, kwargs: dict, message: str) -> None:
    arguments = {"lam_eff": 1.0, **kwargs}
    lam = arguments.pop("lam_eff")
    with pytest.raises(SolverInputError, match=message):
        solve_pseudo_labels(sigma, lam, **arguments)


# -------------------------------------------------------------------------------------- benchmark
def test_quick_benchmark_table() -> None:
    table = solver_table(ks=(10,), quick=True, budget_s=1.0)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| solver"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(COLUMNS)
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| EM") or line.startswith("| PGD")]
    assert len(rows) == 1 * 2 * 4 and all(len(row) == len(COLUMNS) for row in rows)
    certificates = [line.strip("|").split("|") for line in lines if line.startswith("| 10 |")]
    f_star = {float(cells[1]): float(cells[2]) for cells in certificates}
    assert set(f_star) == {0.4, 100.0}
    em_weak = next(row for row in rows if row[0].strip().startswith("EM") and float(row[2]) == 0.4)
    assert em_weak[5].strip().isdigit()  # converged, with an iteration count
    assert float(em_weak[4]) > 0 and float(em_weak[6]) > 0
    assert abs(float(em_weak[7]) - f_star[0.4]) <= tolerance(f_star[0.4])
