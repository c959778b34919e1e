"""SimMatch's persistent state: the distribution-alignment window and the labeled memory bank (spec §8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.components.distribution_alignment import DistributionAlignment
from ssl_lightning.components.memory_bank import LabeledMemoryBank


def _aligned(da: DistributionAlignment, logits: torch.Tensor) -> torch.Tensor:
    return da.log_align(logits).exp()


def test_uniform_window_leaves_predictions_unchanged() -> None:
    """T-DA-uniform."""
    da = DistributionAlignment(4, window=3)
    for _ in range(3):
        da.push(torch.full((2, 4), 0.25))
    logits = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(_aligned(da, logits).double(), logits.softmax(dim=1), atol=1e-6, rtol=0)


def test_window_of_one_sample_aligns_to_uniform() -> None:
    """T-DA-self: N = 1, one sample: p̄ = p^w, so p̃ is uniform."""
    da = DistributionAlignment(3, window=1)
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    da.push(logits.softmax(dim=1))
    torch.testing.assert_close(_aligned(da, logits), torch.full((1, 3), 1 / 3))


def test_alignment_is_scale_invariant_and_matches_the_direct_form() -> None:
    """T-DA-scale and T-DA-stable: ℓ = (2, 0.5, −1), p̄ = (0.5, 0.3, 0.2) → p̃ = (0.6683, 0.2485, 0.0832)."""
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    for scale in (1.0, 0.25):
        da = DistributionAlignment(3, window=2)
        da.push(scale * torch.tensor([[0.5, 0.3, 0.2]]))
        aligned = _aligned(da, logits)
        torch.testing.assert_close(aligned, torch.tensor([[0.6683, 0.2485, 0.0832]]), atol=1e-4, rtol=0)
        direct = logits.softmax(dim=1) / torch.tensor([0.5, 0.3, 0.2])
        torch.testing.assert_close(aligned, direct / direct.sum(), atol=1e-6, rtol=0)


def test_window_forgets_completely() -> None:
    """T-DA-window: N = 2, push e₀, e₁, e₂: p̄ = (e₁ + e₂)/2, n = 2, e₀ gone (not an EMA)."""
    da = DistributionAlignment(3, window=2)
    for c in range(3):
        da.push(F.one_hot(torch.tensor([c]), 3).float())
    torch.testing.assert_close(da.mean(), torch.tensor([0.0, 0.5, 0.5]))
    assert int(da.filled) == 2 and int(da.pointer) == 1


def test_window_skips_non_finite_rows_and_starts_uniform() -> None:
    """T-BANK-nonfinite (DA half): a NaN batch mean is counted, never written."""
    da = DistributionAlignment(2, window=4)
    torch.testing.assert_close(da.mean(), torch.tensor([0.5, 0.5]))
    da.push(torch.tensor([[float("nan"), 1.0]]))
    assert int(da.filled) == 0 and int(da.nonfinite_skips) == 1
    assert torch.isfinite(da.rows).all()


def _bank(size: int = 6, dim: int = 3, momentum: float = 0.7) -> LabeledMemoryBank:
    bank = LabeledMemoryBank(dim, momentum=momentum)
    bank.reset(torch.arange(size) * 10, torch.arange(size) % 2, seed=0)
    return bank


def test_bank_rule_blends_then_renormalises() -> None:
    """T-BANK-rule: Z_i = e₁, z = e₂, m_b = 0.7 → (0.919145, 0.393919, 0); m_b = 0 overwrites."""
    for momentum, expected in ((0.7, [0.919145, 0.393919, 0.0]), (0.0, [0.0, 1.0, 0.0])):
        bank = _bank(momentum=momentum)
        bank.embeddings[2] = torch.tensor([1.0, 0.0, 0.0])
        before = bank.embeddings.clone()
        bank.update(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([1]), torch.tensor([20]))
        torch.testing.assert_close(bank.embeddings[2], torch.tensor(expected), atol=1e-6, rtol=0)
        assert int(bank.labels[2]) == 1 and bool(bank.visited[2]) and int(bank.visited.sum()) == 1
        untouched = torch.arange(6) != 2
        assert torch.equal(bank.embeddings[untouched], before[untouched])  # bit-identical


def test_bank_rows_stay_unit_norm_over_many_updates() -> None:
    bank = _bank(size=50, dim=16)
    generator = torch.Generator().manual_seed(1)
    for _ in range(1000):
        idx = torch.randint(0, 50, (4,), generator=generator) * 10
        bank.update(torch.randn(4, 16, generator=generator), torch.zeros(4, dtype=torch.int64), idx)
    assert (bank.embeddings.norm(dim=1) - 1).abs().max() < 1e-6
    assert bank.visited_fraction() == 1.0


def test_duplicate_indices_use_the_order_independent_mean() -> None:
    """T-BANK-dup: gathered idx (3, 3, 5): Z_3 uses normalize(z_a + z_b), whatever the batch order."""
    z = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    labels, idx = torch.tensor([1, 1, 0]), torch.tensor([30, 30, 50])
    a, b = _bank(momentum=0.0), _bank(momentum=0.0)
    a.update(z, labels, idx)
    order = torch.tensor([2, 1, 0])
    b.update(z[order], labels[order], idx[order])
    torch.testing.assert_close(a.embeddings, b.embeddings)
    torch.testing.assert_close(a.embeddings[3], F.normalize(z[0] + z[1], dim=0))
    torch.testing.assert_close(a.embeddings[5], z[2])
    assert a.labels[3] == 1 and a.labels[5] == 0


def test_nonfinite_embedding_leaves_its_slot_unchanged() -> None:
    """T-BANK-nonfinite (bank half)."""
    bank = _bank()
    before = bank.embeddings.clone()
    bank.update(torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1]), torch.tensor([0, 10]))
    assert torch.equal(bank.embeddings[0], before[0]) and not bool(bank.visited[0])
    assert bool(bank.visited[1]) and int(bank.nonfinite_skips) == 1


def test_slots_map_pool_indices_and_reject_unlabeled_ones() -> None:
    bank = LabeledMemoryBank(4)
    bank.reset(torch.tensor([70, 5, 33]), torch.tensor([2, 0, 1]), seed=0)
    assert bank.slots(torch.tensor([5, 33, 70, 5])).tolist() == [0, 1, 2, 0]
    assert bank.labels.tolist() == [0, 1, 2]  # sorted with their indices
    with pytest.raises(IndexError, match=r"\[6\]"):
        bank.slots(torch.tensor([5, 6]))


def test_bank_init_is_seeded_unit_norm_and_loads_into_an_empty_module() -> None:
    a, b = _bank(), _bank()
    assert torch.equal(a.embeddings, b.embeddings)
    assert (a.embeddings.norm(dim=1) - 1).abs().max() < 1e-6
    fresh = LabeledMemoryBank(3)
    fresh.load_state_dict(a.state_dict())
    for name, value in a.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    with pytest.raises(RuntimeError, match="empty"):
        LabeledMemoryBank(3).update(torch.ones(1, 3), torch.zeros(1), torch.zeros(1))


def test_bank_entropy_of_temperature_scaled_similarities_is_finite_in_bf16_inputs() -> None:
    """bf16 embeddings are cast to fp32 before they reach the bank (spec §9.1)."""
    bank = _bank(dim=8)
    z = F.normalize(torch.randn(3, 8), dim=1).bfloat16()
    bank.update(z, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 10, 20]))
    assert bank.embeddings.dtype == torch.float32
    assert math.isclose(float(bank.embeddings[:3].norm(dim=1).mean()), 1.0, rel_tol=1e-6)
