"""Collision cross-entropy and the clustering baselines' losses (specs/collision_ce.md §8, tests 1–7, 17, 18)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.collision import (
    collision_cross_entropy,
    collision_entropy,
    fairness_kl,
    iic_loss,
    imsat_loss,
    migd_loss,
    self_labelling_objective,
    sinkhorn_pseudo_labels,
    soft_cross_entropy,
)
from ssl_lightning.solvers import solve_pseudo_labels


def _simplex(n: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, k, generator=generator, dtype=dtype), dim=1)


def _logits(n: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, k, generator=generator, dtype=dtype)


# ---------------------------------------------------------------------------------------------- test 1
def test_one_hot_target_equals_shannon_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(torch.softmax(logits, 1), torch.tensor([[0.66524, 0.24473, 0.09003]]),
                               atol=1e-5, rtol=0)
    target = torch.tensor([[1.0, 0.0, 0.0]])
    value = collision_cross_entropy(logits, target)
    assert value.item() == pytest.approx(0.407606, abs=1e-6)
    assert value.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0])).item(), abs=1e-7)
    batch = _logits(16, 7, seed=1)
    hard = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(collision_cross_entropy(batch, F.one_hot(hard, 7).double()),
                               F.cross_entropy(batch, hard), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- test 2
@pytest.mark.parametrize("k", [2, 5, 37])
def test_uniform_target_gives_log_k_and_zero_gradient(k: int) -> None:
    logits = _logits(8, k, seed=k).requires_grad_()
    uniform = torch.full((8, k), 1.0 / k, dtype=torch.float64)
    values = collision_cross_entropy(logits, uniform, reduction="none")
    torch.testing.assert_close(values, torch.full((8,), math.log(k), dtype=torch.float64), atol=1e-12, rtol=0)
    values.sum().backward()
    assert logits.grad is not None
    assert logits.grad.abs().max().item() <= 1e-15


# ---------------------------------------------------------------------------------------------- test 3
def test_symmetry_and_self_collision() -> None:
    y, sigma = _simplex(10, 6, seed=3), _simplex(10, 6, seed=4)
    forward = collision_cross_entropy(sigma.log(), y, reduction="none")
    backward = collision_cross_entropy(y.log(), sigma, reduction="none")
    torch.testing.assert_close(forward, backward, atol=1e-12, rtol=0)
    torch.testing.assert_close(collision_cross_entropy(y.log(), y, reduction="none"), collision_entropy(y),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(collision_entropy(torch.full((1, 4), 0.25)), torch.tensor([math.log(4)]))


# ---------------------------------------------------------------------------------------------- test 4
def test_cosine_decomposition() -> None:
    y, sigma = _simplex(20, 9, seed=5), _simplex(20, 9, seed=6)
    cosine = (y * sigma).sum(1) / (y.norm(dim=1) * sigma.norm(dim=1))
    expected = -torch.log(cosine) + 0.5 * (collision_entropy(y) + collision_entropy(sigma))
    torch.testing.assert_close(collision_cross_entropy(sigma.log(), y, reduction="none"), expected,
                               atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- test 5
def test_gradient_matches_closed_form_and_finite_differences() -> None:
    y = _simplex(6, 5, seed=7)
    y[0] = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0], dtype=torch.float64)  # exact zeros too
    logits = _logits(6, 5, seed=8).requires_grad_()
    collision_cross_entropy(logits, y, reduction="sum").backward()
    sigma = torch.softmax(logits.detach(), 1)
    closed_form = sigma * (1 - y / (sigma * y).sum(1, keepdim=True))
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, closed_form, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda z: collision_cross_entropy(z, y, reduction="none"),
                                    (logits.detach().clone().requires_grad_(),))


# ---------------------------------------------------------------------------------------------- test 6
def test_stable_form_matches_naive_and_stays_finite() -> None:
    y, logits = _simplex(12, 4, seed=9), _logits(12, 4, seed=10)
    naive = -torch.log((torch.softmax(logits, 1) * y).sum(1))
    torch.testing.assert_close(collision_cross_entropy(logits, y, reduction="none"), naive, atol=1e-12, rtol=0)

    extreme = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [3e3, 3e3, -1e4]], requires_grad=True)
    sparse = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    values = collision_cross_entropy(extreme, sparse, reduction="none")
    assert torch.isfinite(values).all()
    # Rows 0–1: all target mass on a class of log-probability −2e4 (−2e4 − ln 2); row 2: σ = y = (½, ½, 0).
    torch.testing.assert_close(values, torch.tensor([2e4, 2e4 + math.log(2), math.log(2)]), atol=1e-2, rtol=1e-6)
    values.sum().backward()
    assert extreme.grad is not None and torch.isfinite(extreme.grad).all()

    half = collision_cross_entropy(logits.half(), y.half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


# ---------------------------------------------------------------------------------------------- test 7
def test_collision_minimiser_is_a_vertex_shannon_copies_the_label() -> None:
    y = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    vertex = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert collision_cross_entropy(vertex.log(), y).item() == pytest.approx(0.510826, abs=1e-6)
    assert collision_cross_entropy(y.log(), y).item() == pytest.approx(0.653926, abs=1e-6)
    assert soft_cross_entropy(y.log(), y).item() == pytest.approx(0.673012, abs=1e-6)

    p = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    grid = torch.stack([p, 1 - p], dim=1)
    targets = y.expand(len(p), 2)
    collision = collision_cross_entropy(grid.log(), targets, reduction="none")
    shannon = soft_cross_entropy(grid.log(), targets, reduction="none")
    assert collision.argmin().item() == len(p) - 1  # decreasing towards the vertex e₀
    assert (collision.diff() < 0).all()
    assert p[shannon.argmin()].item() == pytest.approx(0.6, abs=1e-3)


def test_reductions_and_shape_checks() -> None:
    y, logits = _simplex(5, 3, seed=11), _logits(5, 3, seed=12)
    per_row = collision_cross_entropy(logits, y, reduction="none")
    assert per_row.shape == (5,)
    torch.testing.assert_close(collision_cross_entropy(logits, y, reduction="sum"), per_row.sum())
    torch.testing.assert_close(soft_cross_entropy(logits, y), soft_cross_entropy(logits, y, "none").mean())
    with pytest.raises(ValueError, match="same shape"):
        collision_cross_entropy(logits, y[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        collision_cross_entropy(logits, y, reduction="max")  # type: ignore[arg-type]


def test_fairness_divergences() -> None:
    q = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    u = torch.full((4,), 0.25, dtype=torch.float64)
    forward = float((q[:3] * torch.log(q[:3] / 0.25)).sum())
    assert fairness_kl(q, "forward").item() == pytest.approx(forward, abs=1e-12)
    reverse = float((u * torch.log(u / q.clamp_min(1e-12))).sum())
    assert fairness_kl(q, "reverse").item() == pytest.approx(reverse, abs=1e-9)
    assert fairness_kl(u, "forward").item() == pytest.approx(0.0, abs=1e-15)
    assert fairness_kl(u, "reverse").item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="direction"):
        fairness_kl(u, "both")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- baselines' losses
def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


def test_migd_matches_its_formula() -> None:
    logits = _logits(30, 6, seed=13)
    p = torch.softmax(logits, 1).numpy()
    mean = p.mean(0)
    expected = _entropy(p).mean() + 1.3 * (mean * np.log(6 * mean)).sum()
    assert migd_loss(logits).item() == pytest.approx(expected, abs=1e-12)


def test_imsat_matches_its_formula_and_stops_the_target_gradient() -> None:
    logits, augmented = _logits(30, 6, seed=14), _logits(30, 6, seed=15)
    p, q = torch.softmax(logits, 1).numpy(), torch.softmax(augmented, 1).numpy()
    kl = (p * np.log(p / q)).sum(1).mean()
    expected = kl + 0.1 * (_entropy(p).mean() - 4.0 * _entropy(p.mean(0)))
    assert imsat_loss(logits, augmented).item() == pytest.approx(expected, abs=1e-12)
    clean = logits.clone().requires_grad_()
    imsat_loss(clean, augmented, lam=0.0).backward()
    assert clean.grad is not None and clean.grad.abs().max().item() == 0.0


def test_iic_is_minus_mutual_information() -> None:
    logits, augmented = _logits(40, 5, seed=16), _logits(40, 5, seed=17)
    p, q = torch.softmax(logits, 1).numpy(), torch.softmax(augmented, 1).numpy()
    joint = p.T @ q / 40
    joint = (joint + joint.T) / 2
    joint /= joint.sum()
    mutual = (joint * np.log(joint / np.outer(joint.sum(1), joint.sum(0)))).sum()
    assert iic_loss(logits, augmented).item() == pytest.approx(-mutual, abs=1e-12)
    # Confident, balanced, consistent clusters: I = ln K, plus the 20 empty cells clamped at ε (finite).
    confident = 60.0 * F.one_hot(torch.arange(40) % 5, 5).double()
    eps = 1e-8
    expected = -math.log(5) - 20 * eps * (math.log(eps) + 2 * math.log(5))
    assert iic_loss(confident, confident, eps=eps).item() == pytest.approx(expected, abs=1e-12)


def test_sinkhorn_balances_a_skewed_batch() -> None:
    # Every row prefers class 0; the argmax would put all 60 samples there, SeLa spreads them about evenly.
    generator = torch.Generator().manual_seed(18)
    logits = torch.randn(60, 3, generator=generator, dtype=torch.float64) * 0.2
    logits[:, 0] += 1.5
    probs = torch.softmax(logits, 1)
    assert (probs.argmax(1) == 0).all()
    labels = sinkhorn_pseudo_labels(probs)
    assert labels.dtype == torch.int64 and labels.shape == (60,)
    # The transport plan is balanced to 1e-3; rounding it to hard labels moves a few samples (21/18/21 here).
    counts = torch.bincount(labels, minlength=3)
    assert counts.min().item() >= 15 and counts.max().item() <= 25
    # A confident, already balanced batch keeps its argmax.
    balanced = torch.softmax(8.0 * F.one_hot(torch.arange(60) % 3, 3).double(), 1)
    assert torch.equal(sinkhorn_pseudo_labels(balanced), torch.arange(60) % 3)


def test_self_labelling_objectives() -> None:
    sigma = np.array([[0.8, 0.2], [0.3, 0.7]])
    y = np.array([[1.0, 0.0], [0.5, 0.5]])
    mean = y.mean(0)
    fit_collision = -(np.log(0.8) + np.log(0.5)) / 2
    assert self_labelling_objective(sigma, y, 2.0, "collision") == pytest.approx(
        fit_collision - 2.0 * np.log(mean).mean(), abs=1e-14)
    kl = (mean * np.log(2 * mean)).sum()
    assert self_labelling_objective(sigma, y, 2.0, "collision_fwd") == pytest.approx(fit_collision + 2.0 * kl,
                                                                                     abs=1e-14)
    fit_miadm = -(np.log(0.8) + 0.5 * np.log(0.3) + 0.5 * np.log(0.7)) / 2
    assert self_labelling_objective(torch.from_numpy(sigma), y, 2.0, "miadm") == pytest.approx(
        fit_miadm + 2.0 * kl, abs=1e-14)
    # An empty cluster: ȳ is clamped at 1e-12 inside the logarithm, and 0·ln 0 = 0 in (5).
    hard = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert self_labelling_objective(sigma, hard, 1.0, "collision") == pytest.approx(
        -(np.log(0.8) + np.log(0.3)) / 2 - 0.5 * np.log(1e-12), abs=1e-12)
    assert math.isfinite(self_labelling_objective(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), 1.0, "miadm"))


# ----------------------------------------------------------------------------- test 17 (gradients)
def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # MIGD never touches the augmented view


def _ddp_gradients(loss_fn, views: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Per-rank losses on a gradient-carrying gather, summed by the gather's backward, averaged by DDP."""
    summed = [torch.zeros_like(view) for view in views]
    for _rank in range(world):
        # Each rank holds its own copy of the gathered global batch, as all_gather(sync_grads=True) gives.
        chunks = [[chunk.clone().requires_grad_() for chunk in view.chunk(world)] for view in views]
        loss_fn(*[torch.cat(view_chunks) for view_chunks in chunks]).backward()
        for total, view_chunks in zip(summed, chunks, strict=True):
            total += torch.cat([_grad(chunk) for chunk in view_chunks])  # the all-reduce of the gather
    return [total / world for total in summed]  # DDP averages over ranks


@pytest.mark.parametrize("name", ["migd", "imsat", "iic", "collision"])
@pytest.mark.parametrize("world", [2, 4])
def test_gradients_do_not_depend_on_the_rank_count(name: str, world: int) -> None:
    logits, augmented = _logits(32, 5, seed=19, dtype=torch.float32), _logits(32, 5, seed=20, dtype=torch.float32)
    targets = _simplex(32, 5, seed=21, dtype=torch.float32)
    losses = {
        "migd": lambda z, _z2: migd_loss(z),
        "imsat": imsat_loss,
        "iic": iic_loss,
        "collision": lambda z, z2: collision_cross_entropy(z, targets) + 0.5 * collision_cross_entropy(z2, targets),
    }
    single = [view.clone().requires_grad_() for view in (logits, augmented)]
    losses[name](*single).backward()
    for simulated, reference in zip(_ddp_gradients(losses[name], [logits, augmented], world), single, strict=True):
        torch.testing.assert_close(simulated, _grad(reference), atol=1e-6, rtol=0)
    assert _grad(single[0]).abs().max().item() > 1e-4  # the comparison is not between zeros


# -------------------------------------------------------------------------------- test 18 (argmax)
def test_argmax_solver_turns_collision_ce_into_hard_cross_entropy() -> None:
    logits = _logits(24, 6, seed=22)
    y, stats = solve_pseudo_labels(torch.softmax(logits, 1).numpy(), 100.0, solver="argmax")
    assert stats.iterations == 0
    assert set(np.unique(y)) == {0.0, 1.0} and (y.sum(1) == 1).all()
    torch.testing.assert_close(collision_cross_entropy(logits, torch.from_numpy(y)),
                               F.cross_entropy(logits, logits.argmax(1)), atol=1e-12, rtol=0)
