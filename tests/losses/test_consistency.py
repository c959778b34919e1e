"""Consistency losses against hand values and identities (spec T1–T5, T10, T11, T14)."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_lightning.losses import cutmix_cross_entropy, info_nce, masked_cross_entropy, zscore, zscore_mse


def _rows(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# --- z-MSE ---


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((1.0, 2.0, 3.0), (3.0, 2.0, 1.0), 8 / 3),
        ((1.0, 2.0, 3.0), (1.0, 3.0, 2.0), 2 / 3),
        ((5.0, -1.0), (0.0, 7.0), 2.0),
        ((0.3, -1.2, 4.0, 2.2), (0.9, -3.6, 12.0, 6.6), 0.0),  # 3·v + 0
        ((0.3, -1.2, 4.0, 2.2), (2.3, 0.8, 6.0, 4.2), 0.0),  # v + 2
    ],
)
def test_t1_hand_cases(a: tuple[float, ...], b: tuple[float, ...], expected: float) -> None:
    assert zscore_mse(_rows(a), _rows(b)).item() == pytest.approx(expected, abs=1e-6)
    # fp32 inputs give the same value.
    assert zscore_mse(_rows(a).float(), _rows(b).float()).item() == pytest.approx(expected, abs=1e-5)


def test_t1_batched_mean_over_n_and_c() -> None:
    a, b = _rows((1.0, 2.0, 3.0), (1.0, 2.0, 3.0)), _rows((3.0, 2.0, 1.0), (1.0, 3.0, 2.0))
    assert zscore_mse(a, b).item() == pytest.approx((8 / 3 + 2 / 3) / 2, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100])
def test_t2_pearson_identity_requires_the_unbiased_std(num_classes: int) -> None:
    generator = torch.Generator().manual_seed(num_classes)
    a = torch.randn(64, num_classes, generator=generator, dtype=torch.float64)
    b = 0.5 * a + torch.randn(64, num_classes, generator=generator, dtype=torch.float64)
    identity = 2 * (num_classes - 1) / num_classes * (1 - _pearson(a, b).mean())
    assert zscore_mse(a, b).item() == pytest.approx(identity.item(), rel=1e-9, abs=1e-9)
    # A biased std (divisor C) scales the loss by C/(C−1); the identity check above must reject it.
    biased = (
        (
            ((a - a.mean(1, keepdim=True)) / a.std(1, correction=0, keepdim=True))
            - ((b - b.mean(1, keepdim=True)) / b.std(1, correction=0, keepdim=True))
        )
        .square()
        .mean()
    )
    assert biased.item() == pytest.approx(identity.item() * num_classes / (num_classes - 1), rel=1e-9)
    assert biased.item() != pytest.approx(identity.item(), rel=1e-3)


def test_t3_invariances_and_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    n, c = 32, 7
    a = torch.randn(n, c, generator=generator, dtype=torch.float64)
    b = torch.randn(n, c, generator=generator, dtype=torch.float64)
    scale = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 10 + 0.01
    shift = torch.randn(n, 1, generator=generator, dtype=torch.float64) * 5
    loss = zscore_mse(a, b)
    torch.testing.assert_close(zscore_mse(scale * a + shift, b), loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(zscore_mse(a, scale * b + shift), loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(zscore_mse(b, a), loss, atol=1e-12, rtol=0)

    upper = 4 * (c - 1) / c
    many_a = torch.randn(500, c, generator=generator, dtype=torch.float64)
    many_b = torch.randn(500, c, generator=generator, dtype=torch.float64)
    per_row = torch.stack([zscore_mse(x[None], y[None]) for x, y in zip(many_a, many_b, strict=True)])
    assert per_row.min() >= 0 and per_row.max() <= upper + 1e-12
    # The maximum is reached at ρ = −1, the minimum at ρ = 1.
    assert zscore_mse(a, -2 * a + 1).item() == pytest.approx(upper, abs=1e-9)
    assert zscore_mse(a, a).item() == 0.0


def test_t4_gradient_is_orthogonal_to_ones_and_to_the_input() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(8, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    grad_a, grad_b = torch.autograd.grad(zscore_mse(a, b), (a, b))
    assert grad_a.abs().max() > 1e-3  # non-trivial
    for grad, x in ((grad_a, a), (grad_b, b)):
        # Shift invariance ⇒ ⟨∇, 1⟩ = 0; scale invariance (Euler) ⇒ ⟨∇, v⟩ = 0, per row.
        torch.testing.assert_close(grad.sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close((grad * x).sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    # At the optimum v¹ = a·v² + b the gradient vanishes.
    v1 = (3 * b.detach() - 1).requires_grad_(True)
    (grad_opt,) = torch.autograd.grad(zscore_mse(v1, b.detach()), (v1,))
    assert grad_opt.abs().max() < 1e-12


def test_t5_constant_row_is_finite() -> None:
    a = _rows((2.0, 2.0, 2.0), (1.0, 2.0, 3.0)).requires_grad_(True)
    b = _rows((1.0, 2.0, 3.0), (3.0, 2.0, 1.0)).requires_grad_(True)
    loss = zscore_mse(a, b)
    loss.backward()
    # z(constant) = 0, so the first row contributes ‖z(1,2,3)‖² = 2.
    assert loss.item() == pytest.approx((2 + 8) / 6, abs=1e-9)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert torch.equal(zscore(a.detach())[0], torch.zeros(3, dtype=torch.float64))
    # Without the ε guard the constant row is 0/0.
    x = a.detach()
    assert torch.isnan((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).any()
    # bf16 inputs are promoted to fp32.
    assert zscore(torch.ones(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_zscore_rejects_single_class() -> None:
    with pytest.raises(ValueError):
        zscore(torch.zeros(3, 1))


# --- InfoNCE ---


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, 0.313262), (0.2, 0.006715)])
def test_t14_hand_values(temperature: float, expected: float) -> None:
    pair = torch.eye(2, 3, dtype=torch.float64)
    assert info_nce(pair, pair, temperature).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(math.log1p(math.exp(-1 / temperature)), abs=1e-6)
    # Embeddings are normalised inside: the norms do not matter.
    assert info_nce(pair * 7, pair * 0.1, temperature).item() == pytest.approx(expected, abs=1e-6)


def test_t14_identical_embeddings_give_log_n_and_views_are_symmetric() -> None:
    same = torch.ones(5, 8)
    assert info_nce(same, same, 0.2).item() == pytest.approx(math.log(5), abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    torch.testing.assert_close(info_nce(z1, z2, 0.2), info_nce(z2, z1, 0.2))
    assert info_nce(z1.bfloat16(), z2.bfloat16(), 0.2).dtype == torch.float32


def test_t14_global_candidate_form() -> None:
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    z2 = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    full = info_nce(z1, z2, 0.2)
    torch.testing.assert_close(info_nce(z1, z2, 0.2, z_a_all=z1, z_b_all=z2, offset=0), full)
    # Two "ranks" with 3 local anchors each, scored against all 6: their mean is the global loss.
    halves = [
        info_nce(z1[r * 3 : r * 3 + 3], z2[r * 3 : r * 3 + 3], 0.2, z1, z2, offset=r * 3) for r in range(2)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full, atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        info_nce(z1[:3], z2[:3], 0.2, z1, z2, offset=4)
    with pytest.raises(ValueError):
        info_nce(z1, z2, 0.2, z_a_all=z1)


# --- pseudo-label cross-entropies ---


def test_t10_cutmix_hand_case() -> None:
    loss = cutmix_cross_entropy(
        torch.zeros(2, 2),
        pseudo_labels=torch.tensor([0, 1]),
        mask=torch.tensor([1.0, 0.0]),
        lam=torch.tensor([0.75, 0.5]),
        partner_labels=torch.tensor([1, 0]),  # ŷ_π with π = (1, 0)
        partner_mask=torch.tensor([0.0, 1.0]),
    )
    assert loss.item() == pytest.approx(0.625 * math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(0.433217, abs=1e-6)


def test_t10_identity_permutation_reduces_to_masked_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 4, generator=generator)
    labels = torch.randint(0, 4, (10,), generator=generator)
    mask = (torch.rand(10, generator=generator) > 0.4).float()
    lam = 0.5 + 0.5 * torch.rand(10, generator=generator)
    reduced = cutmix_cross_entropy(logits, labels, mask, lam, labels, mask)
    torch.testing.assert_close(reduced, masked_cross_entropy(logits, labels, mask))
    expected = (mask * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).mean()
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask), expected)


def test_cutmix_loss_does_not_promote_to_float64() -> None:
    loss = cutmix_cross_entropy(
        torch.zeros(2, 3),
        torch.tensor([0, 2]),
        torch.ones(2),
        torch.tensor([0.6, 0.9], dtype=torch.float64),
        torch.tensor([2, 0]),
        torch.ones(2),
    )
    assert loss.dtype == torch.float32
    assert masked_cross_entropy(
        torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0, 2]), torch.ones(2)
    ).dtype == (torch.float32)


def test_t11_zero_mask_gives_exact_zero_and_divisor_is_n() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(8, 5, generator=generator) * 30).requires_grad_(True)
    labels = torch.randint(0, 5, (8,), generator=generator)
    zero = torch.zeros(8)
    lam = 0.5 + 0.5 * torch.rand(8, generator=generator)
    permutation = torch.randperm(8, generator=generator)
    for loss in (
        masked_cross_entropy(logits, labels, zero),
        cutmix_cross_entropy(logits, labels, zero, lam, labels[permutation], zero[permutation]),
    ):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and (grad == 0).all()

    # Constant per-sample CE (zero logits): masking half the batch halves the loss.
    flat = torch.zeros(8, 5)
    half = torch.tensor([1.0, 0.0] * 4)
    assert masked_cross_entropy(flat, labels, torch.ones(8)).item() == pytest.approx(math.log(5), abs=1e-6)
    assert masked_cross_entropy(flat, labels, half).item() == pytest.approx(math.log(5) / 2, abs=1e-6)
    assert cutmix_cross_entropy(flat, labels, half, lam, labels, half).item() == pytest.approx(
        math.log(5) / 2, abs=1e-6
    )
    # Boolean masks are accepted as well.
    assert masked_cross_entropy(flat, labels, half.bool()).item() == pytest.approx(math.log(5) / 2, abs=1e-6)
