"""uwbssl entropy weight, sharpening and divergences against specs/bhattacharyya.md §8 tests 1–5 and 15."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.divergences import (
    DIVERGENCES,
    Divergence,
    divergence,
    normalized_entropy,
    sharpen_log,
    uncertainty_weight,
)

D64 = torch.float64
KINDS: tuple[str, ...] = get_args(Divergence)
SYMMETRIC = ("bhattacharyya", "js", "hellinger", "tv")


def _probs(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=D64)


def _q() -> torch.Tensor:
    return _probs(0.7, 0.2, 0.1)


def _p() -> torch.Tensor:
    return _probs(0.5, 0.3, 0.2)


def _d(kind: str, target: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """D(target ‖ p) from probabilities: logits = log p, so softmax(logits) = p."""
    return divergence(target.log(), p.log(), kind)  # type: ignore[arg-type]


def _random_pair(
    seed: int, n: int = 64, num_classes: int = 7, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q̃, logits) with a spread of sharp and flat rows; scale sets how peaked they get."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 0, n, dtype=D64).unsqueeze(1) * scale
    target_logits = torch.randn(n, num_classes, generator=generator, dtype=D64) * spread
    logits = torch.randn(n, num_classes, generator=generator, dtype=D64) * spread
    return F.log_softmax(target_logits, dim=1), logits


def _peaked(m: float, num_classes: int = 10) -> torch.Tensor:
    q = torch.full((1, num_classes), (1 - m) / (num_classes - 1), dtype=D64)
    q[0, 0] = m
    return q


def test_kinds_are_the_literal_values() -> None:
    assert KINDS == DIVERGENCES == ("bhattacharyya", "kl", "js", "hellinger", "tv")


# --- 1. Entropy and weight ---


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100])
def test_entropy_of_uniform_is_one(num_classes: int) -> None:
    log_uniform = torch.full((2, num_classes), -math.log(num_classes), dtype=D64)
    torch.testing.assert_close(normalized_entropy(log_uniform), torch.ones(2, dtype=D64), atol=1e-12, rtol=0)


def test_entropy_of_one_hot_is_exactly_zero_without_nan() -> None:
    log_one_hot = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 0.0, -math.inf]], dtype=D64)
    log_one_hot.requires_grad_(True)
    e = normalized_entropy(log_one_hot)
    assert torch.equal(e.detach(), torch.zeros(2, dtype=D64))
    e.sum().backward()
    assert log_one_hot.grad is not None and torch.isfinite(log_one_hot.grad).all()
    # A one-hot reached through fp32 logits ±80 (exp(−160) underflows to 0) is also exactly 0.
    log_probs = F.log_softmax(torch.tensor([[80.0, -80.0, -80.0]]), dim=1)
    assert normalized_entropy(log_probs).item() == 0.0


@pytest.mark.parametrize(
    ("m", "expected_e", "expected_w"),
    [
        (0.999, 0.0044, 0.0175),
        (0.99, 0.0339, 0.1309),
        (0.95, 0.1339, 0.4640),
        (0.90, 0.2366, 0.7225),
        (0.80, 0.4082, 0.9663),
        (0.50, 0.7782, 0.6905),
    ],
)
def test_entropy_and_weight_golden_table(m: float, expected_e: float, expected_w: float) -> None:
    """C = 10, max q = m, the remaining mass spread uniformly."""
    e = normalized_entropy(_peaked(m).log())
    assert e.item() == pytest.approx(expected_e, abs=1e-4)
    assert uncertainty_weight(e).item() == pytest.approx(expected_w, abs=1e-4)


def test_weight_is_a_symmetric_bell_on_the_unit_interval() -> None:
    e = torch.linspace(0, 1, 1001, dtype=D64)
    w = uncertainty_weight(e)
    assert uncertainty_weight(torch.tensor([0.0, 1.0], dtype=D64)).tolist() == [0.0, 0.0]
    assert uncertainty_weight(torch.tensor(0.5, dtype=D64)).item() == 1.0
    torch.testing.assert_close(w, uncertainty_weight(1 - e), atol=1e-12, rtol=0)
    assert (w >= 0).all() and (w <= 1).all()


def test_entropy_and_weight_stay_in_bounds_on_random_rows() -> None:
    log_probs, _ = _random_pair(0, n=256, num_classes=10, scale=20.0)
    log_probs = torch.cat([log_probs, torch.full((1, 10), -math.log(10), dtype=D64)])
    e = normalized_entropy(log_probs)
    w = uncertainty_weight(e)
    assert e.shape == (257,)
    assert (e >= 0).all() and (e <= 1).all() and (w >= 0).all() and (w <= 1).all()


def test_entropy_reduces_the_last_dim_and_upcasts_half_precision() -> None:
    log_probs = F.log_softmax(torch.randn(4, 5, 10, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert normalized_entropy(log_probs).shape == (4, 5)
    assert normalized_entropy(log_probs.bfloat16()).dtype == torch.float32
    assert normalized_entropy(log_probs.double()).dtype == D64
    assert uncertainty_weight(torch.tensor([0.5], dtype=torch.bfloat16)).dtype == torch.float32


def test_entropy_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="C >= 2"):
        normalized_entropy(torch.zeros(3, 1, dtype=D64))


# --- 2. Sharpen ---


def test_sharpen_golden_value() -> None:
    sharpened = sharpen_log(_q().log(), temperature=0.5).exp()
    torch.testing.assert_close(sharpened, _probs(0.907407, 0.074074, 0.018519), atol=1e-6, rtol=0)


def test_sharpen_at_temperature_one_is_the_identity() -> None:
    log_probs, _ = _random_pair(2)
    torch.testing.assert_close(sharpen_log(log_probs, 1.0), log_probs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [0.25, 0.5, 0.7, 2.0])
def test_sharpen_of_softmax_is_softmax_at_temperature(temperature: float) -> None:
    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(3), dtype=D64) * 4
    torch.testing.assert_close(
        sharpen_log(F.log_softmax(logits, dim=1), temperature),
        F.log_softmax(logits / temperature, dim=1),
        atol=1e-10,
        rtol=0,
    )


def test_sharpen_tends_to_one_hot_as_temperature_vanishes() -> None:
    log_probs, _ = _random_pair(4)
    sharpened = sharpen_log(log_probs, 1e-4).exp()
    one_hot = F.one_hot(log_probs.argmax(dim=1), log_probs.shape[1]).to(D64)
    # Ties would split the mass; random doubles have none, but rows with a near-tie converge slowly.
    gap = log_probs.topk(2, dim=1).values.diff(dim=1).abs().squeeze(1)
    clear = gap > 1e-2
    assert clear.sum() > 50
    torch.testing.assert_close(sharpened[clear], one_hot[clear], atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_sharpen_is_finite_in_fp32_at_extreme_logits(temperature: float) -> None:
    logits = torch.tensor(
        [[80.0, -80.0, 0.0], [-80.0, 80.0, 80.0], [-80.0, -80.0, -80.0]], requires_grad=True
    )
    sharpened = sharpen_log(F.log_softmax(logits, dim=1), temperature)
    assert sharpened.dtype == torch.float32 and torch.isfinite(sharpened).all()
    torch.testing.assert_close(sharpened.exp().sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    (sharpened * torch.randn(3, 3, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # One-hot log-targets keep their −inf entries and gain no NaN.
    one_hot = sharpen_log(torch.tensor([[0.0, -math.inf, -math.inf]]), temperature)
    assert one_hot[0, 0].item() == 0.0 and torch.isneginf(one_hot[0, 1:]).all()


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_sharpen_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        sharpen_log(_q().log(), temperature)


# --- 3. Divergences ---


@pytest.mark.parametrize(
    ("kind", "target", "expected"),
    [
        ("bhattacharyya", "q", 0.022268),
        ("kl", "q", 0.085123),
        ("js", "q", 0.021901),
        ("hellinger", "q", 0.022022),
        ("tv", "q", 0.2),
        ("kl", "p", 0.092033),  # KL(p ‖ q̃): target and prediction swapped
    ],
)
def test_divergence_golden_values(kind: str, target: str, expected: float) -> None:
    first, second = (_q(), _p()) if target == "q" else (_p(), _q())
    assert _d(kind, first, second).item() == pytest.approx(expected, abs=1e-6)


def test_bhattacharyya_coefficient_golden_value() -> None:
    assert math.exp(-_d("bhattacharyya", _q(), _p()).item()) == pytest.approx(0.977978, abs=1e-6)
    assert 1 - _d("hellinger", _q(), _p()).item() == pytest.approx(0.977978, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(kind: str) -> None:
    log_target, _ = _random_pair(5)
    # The logits are log q̃ shifted per row: softmax removes the shift, so p = q̃.
    value = divergence(log_target, log_target + 3.0, kind)  # type: ignore[arg-type]
    torch.testing.assert_close(value, torch.zeros(64, dtype=D64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", SYMMETRIC)
def test_symmetric_divergences(kind: str) -> None:
    log_q, logits = _random_pair(6)
    log_p = F.log_softmax(logits, dim=1)
    forward = divergence(log_q, log_p, kind)  # type: ignore[arg-type]
    backward = divergence(log_p, log_q, kind)  # type: ignore[arg-type]
    torch.testing.assert_close(forward, backward, atol=1e-10, rtol=0)


def test_kl_is_not_symmetric() -> None:
    assert _d("kl", _q(), _p()).item() != pytest.approx(_d("kl", _p(), _q()).item(), abs=1e-3)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_inequalities_between_divergences(scale: float) -> None:
    log_q, logits = _random_pair(7, n=256, scale=scale)
    log_p = F.log_softmax(logits, dim=1)
    d_b = divergence(log_q, logits, "bhattacharyya")
    h2 = divergence(log_q, logits, "hellinger")
    kl_qp = divergence(log_q, logits, "kl")
    kl_pq = divergence(log_p, log_q, "kl")
    js = divergence(log_q, logits, "js")
    tv = divergence(log_q, logits, "tv")
    torch.testing.assert_close(d_b, -torch.log1p(-h2), atol=1e-9, rtol=1e-9)
    assert (h2 <= d_b + 1e-12).all()
    assert (d_b <= 0.5 * torch.minimum(kl_qp, kl_pq) + 1e-12).all()
    assert (js >= -1e-12).all() and (js <= math.log(2) + 1e-12).all()
    assert (h2 >= -1e-12).all() and (h2 <= 1 + 1e-12).all()
    assert (tv >= 0).all() and (tv <= 1 + 1e-12).all()


@pytest.mark.parametrize("kind", KINDS)
def test_divergences_are_invariant_under_a_joint_class_permutation(kind: str) -> None:
    log_q, logits = _random_pair(8)
    permutation = torch.randperm(log_q.shape[1], generator=torch.Generator().manual_seed(8))
    original = divergence(log_q, logits, kind)  # type: ignore[arg-type]
    permuted = divergence(log_q[:, permutation], logits[:, permutation], kind)  # type: ignore[arg-type]
    torch.testing.assert_close(original, permuted, atol=1e-12, rtol=0)


def test_unknown_kind_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="bhattacharyya, kl, js, hellinger, tv"):
        divergence(_q().log(), _p().log(), "wasserstein")  # type: ignore[arg-type]


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        divergence(_q().log(), torch.zeros(1, 4, dtype=D64))


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_shape_and_precision(kind: str) -> None:
    log_q, logits = _random_pair(9)
    value = divergence(log_q.view(8, 8, 7), logits.view(8, 8, 7), kind)  # type: ignore[arg-type]
    assert value.shape == (8, 8) and value.dtype == D64
    half = divergence(log_q.bfloat16(), logits.bfloat16(), kind)  # type: ignore[arg-type]
    assert half.dtype == torch.float32
    mixed = divergence(log_q.float(), logits, kind)  # type: ignore[arg-type]
    assert mixed.dtype == D64


# --- 4. Hard targets ---


def test_hard_target_golden_values() -> None:
    delta = _probs(1.0, 0.0, 0.0)
    assert _d("bhattacharyya", delta, _p()).item() == pytest.approx(0.346574, abs=1e-6)
    assert _d("bhattacharyya", delta, _p()).item() == pytest.approx(0.5 * math.log(2), abs=1e-12)  # ½ CE
    assert _d("hellinger", delta, _p()).item() == pytest.approx(0.292893, abs=1e-6)  # 1 − √p₀
    assert _d("kl", delta, _p()).item() == pytest.approx(math.log(2), abs=1e-12)  # CE
    assert _d("tv", delta, _p()).item() == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_zeros_in_the_target_give_finite_values_and_gradients(kind: str, dtype: torch.dtype) -> None:
    log_target = torch.tensor(
        [[0.0, -math.inf, -math.inf], [math.log(0.5), math.log(0.5), -math.inf], [-math.inf, -math.inf, 0.0]],
        dtype=dtype,
    )
    logits = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, -80.0], [0.3, -1.0, 2.0]], dtype=dtype)
    logits.requires_grad_(True)
    value = divergence(log_target, logits, kind)  # type: ignore[arg-type]
    assert torch.isfinite(value).all() and (value >= -1e-6).all()
    value.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_bhattacharyya_coefficient_is_not_clamped(dtype: torch.dtype) -> None:
    """p_a = 1e-30 with the target one-hot on a: D_B = −½ log p_a and the gradient stays alive."""
    log_target = torch.tensor([[0.0, -math.inf]], dtype=dtype)
    logits = torch.tensor([[math.log(1e-30), 0.0]], dtype=dtype, requires_grad=True)
    value = divergence(log_target, logits, "bhattacharyya")
    # softmax(logits)_a = 1e-30 / (1 + 1e-30), so −½ log p_a = ½ · 69.0776 up to 1e-30.
    assert value.item() == pytest.approx(0.5 * 69.0776, abs=1e-4)
    assert value.item() == pytest.approx(-0.5 * math.log(1e-30), rel=1e-6)
    value.backward()
    assert logits.grad is not None
    # ∂D_B/∂z_a = ½(p_a − 1): a full-strength pull towards the target class.
    assert logits.grad[0, 0].item() == pytest.approx(-0.5, abs=1e-6)


# --- 5. Gradients ---


def test_bhattacharyya_gradient_golden_value() -> None:
    q, p = _q(), _p()
    logits = p.log().requires_grad_(True)
    divergence(q.log(), logits, "bhattacharyya").sum().backward()
    assert logits.grad is not None
    bc = (q * p).sqrt().sum()
    torch.testing.assert_close(logits.grad, 0.5 * (p - (q * p).sqrt() / bc), atol=1e-12, rtol=0)
    torch.testing.assert_close(logits.grad, _probs(-0.052465, 0.024768, 0.027697), atol=1e-6, rtol=0)
    assert logits.grad.sum().item() == pytest.approx(0.0, abs=1e-12)


def test_bhattacharyya_gradient_vanishes_at_the_target() -> None:
    logits = _q().log().requires_grad_(True)
    divergence(_q().log(), logits, "bhattacharyya").sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_bhattacharyya_gradient_is_bounded_and_matches_closed_form(scale: float) -> None:
    log_q, logits = _random_pair(10, n=256, scale=scale)
    logits.requires_grad_(True)
    divergence(log_q, logits, "bhattacharyya").sum().backward()
    grad = logits.grad
    assert grad is not None
    assert (grad.abs() <= 0.5 + 1e-12).all()
    torch.testing.assert_close(grad.sum(dim=1), torch.zeros(256, dtype=D64), atol=1e-12, rtol=0)
    log_p = F.log_softmax(logits.detach(), dim=1)
    log_ratio = 0.5 * (log_q + log_p) - torch.logsumexp(0.5 * (log_q + log_p), dim=1, keepdim=True)
    torch.testing.assert_close(grad, 0.5 * (log_p.exp() - log_ratio.exp()), atol=1e-12, rtol=0)


def test_kl_gradient_is_p_minus_target() -> None:
    logits = _p().log().requires_grad_(True)
    divergence(_q().log(), logits, "kl").sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, _probs(-0.2, 0.1, 0.1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_target_receives_no_gradient(kind: str) -> None:
    log_target = _q().log().requires_grad_(True)
    logits = _p().log().requires_grad_(True)
    divergence(log_target, logits, kind).sum().backward()  # type: ignore[arg-type]
    assert log_target.grad is None
    assert logits.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_matches_finite_differences(kind: str) -> None:
    log_q, logits = _random_pair(11, n=6, num_classes=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: divergence(log_q, z, kind), (logits,))  # type: ignore[arg-type]


# --- 15. Why TV is shipped and the 1-D Wasserstein distance is not ---


def _w1_over_class_index(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """W₁ under the ordinal ground metric |i − j|: Σ_{k<C−1} |F_q(k) − F_p(k)|."""
    return (q.cumsum(dim=-1) - p.cumsum(dim=-1))[..., :-1].abs().sum(dim=-1)


def test_tv_is_relabel_invariant_while_index_w1_is_not() -> None:
    delta = torch.eye(3, dtype=D64)
    assert _w1_over_class_index(delta[0], delta[1]).item() == 1.0
    assert _w1_over_class_index(delta[0], delta[2]).item() == 2.0
    # Relabelling classes 1 ↔ 2 changes W₁ but not TV: both pairs are disjoint point masses.
    assert divergence(delta[0].log(), delta[1].log(), "tv").item() == 1.0
    assert divergence(delta[0].log(), delta[2].log(), "tv").item() == 1.0
    log_q, logits = _random_pair(12)
    q, p = log_q.exp(), F.softmax(logits, dim=1)
    swap = torch.tensor([0, 2, 1, 3, 4, 5, 6])
    torch.testing.assert_close(
        divergence(log_q, logits, "tv"), divergence(log_q[:, swap], logits[:, swap], "tv"), atol=1e-12, rtol=0
    )
    assert not torch.allclose(_w1_over_class_index(q, p), _w1_over_class_index(q[:, swap], p[:, swap]))
    assert "wasserstein" not in DIVERGENCES
