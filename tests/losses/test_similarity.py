"""SimMatch's propagation math against the hand-computed cases and identities of specs/simmatch.md §8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.similarity import (
    aggregate,
    instance_consistency,
    propagate,
    semantic_consistency,
    soft_cross_entropy,
)

D64 = torch.float64


def _hand_case(alpha: float = 0.9) -> tuple:
    bank = torch.eye(3, dtype=D64)
    bank_labels = torch.tensor([0, 0, 1])
    weak = torch.tensor([[1.0, 0.0, 0.0]], dtype=D64)
    log_aligned = torch.tensor([[0.8, 0.2]], dtype=D64).log()
    return weak, bank, bank_labels, log_aligned, alpha


def test_propagation_hand_case() -> None:
    """T-PROP-hand: Z = I₃, y^Z = (0, 0, 1), z^w = e₁, t = 1, p̃ = (0.8, 0.2), α = 0.9."""
    weak, bank, bank_labels, log_aligned, alpha = _hand_case()
    targets = propagate(weak.float(), bank.float(), bank_labels, log_aligned.float(), temperature=1.0, alpha=alpha)
    e = math.e
    torch.testing.assert_close(targets.weak_similarity[0].double(),
                               torch.tensor([e, 1, 1], dtype=D64) / (e + 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(targets.instance_target[0].double(),
                               torch.tensor([0.685002, 0.251998, 0.063000], dtype=D64), atol=1e-6, rtol=0)
    torch.testing.assert_close(targets.aggregated[0].double(),
                               torch.tensor([0.788058, 0.211942], dtype=D64), atol=1e-6, rtol=0)
    torch.testing.assert_close(targets.semantic_target[0].double(),
                               torch.tensor([0.798806, 0.201194], dtype=D64), atol=1e-6, rtol=0)
    # The stable form of scaling equals the direct one: q^w ⊙ ū, renormalised.
    direct = targets.weak_similarity * torch.tensor([0.8, 0.8, 0.2])
    torch.testing.assert_close(targets.instance_target, direct / direct.sum(), atol=1e-7, rtol=0)


def test_instance_loss_hand_case_and_closed_form_gradient() -> None:
    """Student z^s = e₂: q^s = (0.2119, 0.5761, 0.2119), L_in = 1.299446, ∂L_in/∂s^s = (q^s − q̂)/(N·t)."""
    weak, bank, bank_labels, log_aligned, alpha = _hand_case()
    targets = propagate(weak, bank, bank_labels, log_aligned, temperature=1.0, alpha=alpha)
    similarity = torch.tensor([[0.0, 1.0, 0.0]], dtype=D64, requires_grad=True)
    loss = soft_cross_entropy(targets.instance_target, similarity).mean()
    assert loss.item() == pytest.approx(1.299446, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(similarity.grad[0], torch.tensor([-0.473061, 0.324119, 0.148942], dtype=D64),
                               atol=1e-6, rtol=0)
    # The same through the embedding-level function (the bank receives no gradient).
    strong = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    bank32 = bank.float().requires_grad_(True)
    loss = instance_consistency(targets.instance_target.float(), strong, bank32, temperature=1.0)
    assert loss.item() == pytest.approx(1.299446, abs=1e-5)
    loss.backward()
    assert bank32.grad is None


def test_uniform_aligned_probs_leave_instance_target_unscaled() -> None:
    """T-PROP-uniform: q̂ = q^w when p̃ is uniform."""
    torch.manual_seed(0)
    weak = F.normalize(torch.randn(5, 8, dtype=D64), dim=1)
    bank = F.normalize(torch.randn(12, 8, dtype=D64), dim=1)
    labels = torch.randint(0, 4, (12,))
    log_uniform = torch.full((5, 4), -math.log(4), dtype=D64)
    targets = propagate(weak, bank, labels, log_uniform, temperature=0.1, alpha=0.9)
    torch.testing.assert_close(targets.instance_target, targets.weak_similarity)


def test_peaked_aligned_probs_concentrate_on_the_class_slots_without_nan() -> None:
    """T-PROP-peaked at ε = 1e-30: q̂ is q^w restricted to class-c slots and renormalised."""
    torch.manual_seed(1)
    weak = F.normalize(torch.randn(3, 8, dtype=D64), dim=1)
    bank = F.normalize(torch.randn(10, 8, dtype=D64), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    eps = 1e-30
    aligned = torch.full((3, 3), eps / 3, dtype=D64)
    aligned[:, 0] += 1 - eps
    targets = propagate(weak, bank, labels, aligned.log(), temperature=0.1, alpha=0.9)
    assert torch.isfinite(targets.instance_target).all()
    restricted = targets.weak_similarity * (labels == 0)
    torch.testing.assert_close(targets.instance_target, restricted / restricted.sum(dim=1, keepdim=True))


def test_aggregation_identities() -> None:
    """T-AGG: rows sum to 1; one bank label gives e_c; a permutation bank gives a_{π(i)} = q^w_i."""
    torch.manual_seed(2)
    q = torch.randn(4, 6, dtype=D64).softmax(dim=1)
    a = aggregate(q, torch.randint(0, 3, (6,)), 3)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(4, dtype=D64))
    torch.testing.assert_close(aggregate(q, torch.full((6,), 2), 3), torch.tensor([[0.0, 0.0, 1.0]] * 4, dtype=D64))
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    a = aggregate(q, permutation, 6)
    torch.testing.assert_close(a[:, permutation], q)


def test_permuting_bank_slots_permutes_similarities_and_leaves_losses_unchanged() -> None:
    """T-PERM."""
    torch.manual_seed(3)
    weak, strong = (F.normalize(torch.randn(4, 8, dtype=D64), dim=1) for _ in range(2))
    bank = F.normalize(torch.randn(9, 8, dtype=D64), dim=1)
    labels = torch.randint(0, 3, (9,))
    log_aligned = torch.randn(4, 3, dtype=D64).log_softmax(dim=1)
    strong_logits = torch.randn(4, 3, dtype=D64)
    perm = torch.randperm(9)
    a = propagate(weak, bank, labels, log_aligned, 0.1, 0.9)
    b = propagate(weak, bank[perm], labels[perm], log_aligned, 0.1, 0.9)
    torch.testing.assert_close(b.weak_similarity, a.weak_similarity[:, perm])
    torch.testing.assert_close(b.instance_target, a.instance_target[:, perm])
    torch.testing.assert_close(b.aggregated, a.aggregated)
    torch.testing.assert_close(b.semantic_target, a.semantic_target)
    mask = torch.ones(4)
    torch.testing.assert_close(semantic_consistency(b.semantic_target, strong_logits, mask),
                               semantic_consistency(a.semantic_target, strong_logits, mask))
    torch.testing.assert_close(instance_consistency(b.instance_target, strong, bank[perm], 0.1),
                               instance_consistency(a.instance_target, strong, bank, 0.1), atol=1e-6, rtol=1e-6)


def test_temperature_limits() -> None:
    """T-TEMP: t → ∞ gives uniform q^w and label-count aggregation; t → 0 gives one-hot q^w."""
    torch.manual_seed(4)
    weak = F.normalize(torch.randn(2, 8, dtype=D64), dim=1)
    bank = F.normalize(torch.randn(6, 8, dtype=D64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    aligned = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=D64)
    hot = propagate(weak, bank, labels, aligned.log(), temperature=1e6, alpha=0.9)
    torch.testing.assert_close(hot.weak_similarity, torch.full((2, 6), 1 / 6, dtype=D64), atol=1e-5, rtol=0)
    torch.testing.assert_close(hot.aggregated, torch.tensor([[3 / 6, 2 / 6, 1 / 6]] * 2, dtype=D64), atol=1e-5, rtol=0)
    unfolded = aligned[:, labels]
    torch.testing.assert_close(hot.instance_target, unfolded / unfolded.sum(dim=1, keepdim=True), atol=1e-5, rtol=0)
    cold = propagate(weak, bank, labels, aligned.log(), temperature=1e-4, alpha=0.9)
    nearest = (weak @ bank.T).argmax(dim=1)
    torch.testing.assert_close(cold.weak_similarity, F.one_hot(nearest, 6).to(D64), atol=1e-6, rtol=0)


def test_mask_is_taken_on_the_smoothed_target() -> None:
    """T-MASK-p̂: p̃ = (0.96, 0.04) passes τ = 0.95, but a = (0, 1) smooths it to (0.864, 0.136): masked out."""
    bank = torch.tensor([[0.0, 1.0]])
    weak = torch.tensor([[0.0, 1.0]])
    targets = propagate(weak, bank, torch.tensor([1]), torch.tensor([[0.96, 0.04]]).log(), 0.1, 0.9)
    torch.testing.assert_close(targets.aggregated, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(targets.semantic_target, torch.tensor([[0.864, 0.136]]))
    assert not targets.semantic_target.max() >= 0.95


@pytest.mark.parametrize("threshold,alpha", [(0.95, 0.9), (0.7, 0.9), (0.8, 0.5)])
def test_accepted_samples_satisfy_the_mask_bounds(threshold: float, alpha: float) -> None:
    """T-MASK-bounds: w = 1 implies a_{c*} ≥ (τ − α)/(1 − α) and p̃_{c*} ≥ (τ − 1 + α)/α."""
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        weak = F.normalize(torch.randn(64, 8, generator=generator, dtype=D64), dim=1)
        bank = F.normalize(torch.randn(20, 8, generator=generator, dtype=D64), dim=1)
        labels = torch.randint(0, 4, (20,), generator=generator)
        log_aligned = (4 * torch.randn(64, 4, generator=generator, dtype=D64)).log_softmax(dim=1)
        t = propagate(weak, bank, labels, log_aligned, 0.05, alpha)
        confidence, best = t.semantic_target.max(dim=1)
        accepted = confidence >= threshold
        a_best = t.aggregated.gather(1, best[:, None])[:, 0]
        p_best = log_aligned.exp().gather(1, best[:, None])[:, 0]
        assert (a_best[accepted] >= (threshold - alpha) / (1 - alpha) - 1e-9).all()
        assert (p_best[accepted] >= (threshold - 1 + alpha) / alpha - 1e-9).all()


def test_semantic_loss_divides_by_all_unlabeled_samples() -> None:
    """T-Lu-norm: N = 4, two samples pass with CE 0.3 and 0.5 → L_u = 0.2, not 0.4."""
    target = torch.tensor([[1.0, 0.0]] * 4, dtype=D64)
    correct = torch.tensor([0.3, 0.5, 0.1, 0.9], dtype=D64).neg().exp()  # p(target class) = e^{−CE}
    logits = torch.stack([correct.log(), (1 - correct).log()], dim=1)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D64)
    assert semantic_consistency(target, logits, mask).item() == pytest.approx(0.2)


def test_instance_loss_is_bounded_below_by_the_target_entropy() -> None:
    """T-Lin-bound: L_in ≥ H(q̂), with equality when the student matches; z^s = z^w, uniform p̃ gives H(q^w)."""
    torch.manual_seed(6)
    weak = F.normalize(torch.randn(5, 8, dtype=D64), dim=1)
    strong = F.normalize(torch.randn(5, 8, dtype=D64), dim=1)
    bank = F.normalize(torch.randn(7, 8, dtype=D64), dim=1)
    labels = torch.randint(0, 3, (7,))
    log_aligned = torch.randn(5, 3, dtype=D64).log_softmax(dim=1)
    t = propagate(weak, bank, labels, log_aligned, 0.1, 0.9)
    entropy = -(t.instance_target * t.instance_target.log()).sum(dim=1).mean()
    assert instance_consistency(t.instance_target, strong, bank, 0.1) >= entropy - 1e-12
    uniform = torch.full((5, 3), -math.log(3), dtype=D64)
    t = propagate(weak, bank, labels, uniform, 0.1, 0.9)
    entropy = -(t.weak_similarity * t.weak_similarity.log()).sum(dim=1).mean()
    torch.testing.assert_close(instance_consistency(t.instance_target, weak, bank, 0.1), entropy)


def test_semantic_loss_gradient_matches_closed_form() -> None:
    """T-GRAD: ∂L_u/∂ℓ^s_b = w_b (σ(ℓ^s_b) − p̂_b) / N."""
    torch.manual_seed(7)
    logits = torch.randn(4, 3, dtype=D64, requires_grad=True)
    target = torch.randn(4, 3, dtype=D64).softmax(dim=1)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=D64)
    semantic_consistency(target, logits, mask).backward()
    expected = mask[:, None] * (logits.detach().float().softmax(dim=1).double() - target) / 4
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=0)


def test_scale_fusion_is_the_normalised_product() -> None:
    torch.manual_seed(8)
    weak = F.normalize(torch.randn(3, 8), dim=1)
    bank = F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    log_aligned = torch.randn(3, 3).log_softmax(dim=1)
    t = propagate(weak, bank, labels, log_aligned, 0.1, 0.9, fusion="scale")
    product = log_aligned.exp() * t.aggregated
    torch.testing.assert_close(t.semantic_target, product / product.sum(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="semantic fusion"):
        propagate(weak, bank, labels, log_aligned, 0.1, 0.9, fusion="product")  # type: ignore[arg-type]
