"""PC-softmax loss, prior and MI sums against specs/infocam.md §8 tests 1–7 and the first part of test 8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.pc_softmax import (
    MI_TERM_KEYS,
    log_pc_scores,
    mi_from_sums,
    mi_terms,
    pc_softmax_loss,
    prior_from_counts,
)

D64 = torch.float64


def _mi(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor, trained_with: str) -> dict:
    sums = mi_terms(logits, targets, log_prior, trained_with)  # type: ignore[arg-type]
    return mi_from_sums(**sums, num_classes=logits.shape[1])


# ------------------------------------------------------------------------------- test 1: hand case


def test_hand_case() -> None:
    log_prior = torch.tensor([0.5, 0.25, 0.25], dtype=D64).log()
    f = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=D64, requires_grad=True)
    y = torch.tensor([1])
    scores = log_pc_scores(f, log_prior).exp()
    torch.testing.assert_close(scores, torch.tensor([[0.8, 1.6, 0.8]], dtype=D64))
    assert float((log_prior.exp() * scores).sum()) == pytest.approx(1.0, abs=1e-12)

    loss = pc_softmax_loss(f, y, log_prior)
    assert float(loss) == pytest.approx(-0.470004, abs=1e-6)
    assert float(loss) < 0  # negative PMI: never assert a PC loss is >= 0
    assert float(F.cross_entropy(f, y)) == pytest.approx(math.log(2.0), abs=1e-12)
    loss.backward()
    torch.testing.assert_close(f.grad, torch.tensor([[0.4, -0.6, 0.2]], dtype=D64))

    mi = _mi(f.detach(), y, log_prior, "ce")
    assert mi["mi_bal"] == pytest.approx(0.405465, abs=1e-6)
    assert mi["mi_pc"] == pytest.approx(math.log(1.6), abs=1e-12)


# ------------------------------------------------------------------ tests 2–3: normalisation, shift


def test_normalisation_for_random_logits_and_priors() -> None:
    gen = torch.Generator().manual_seed(0)
    for num_classes in (2, 5, 37):
        logits = 4 * torch.randn(64, num_classes, generator=gen)
        log_prior = prior_from_counts(torch.randint(1, 100, (num_classes,), generator=gen))
        total = (log_prior.exp() * log_pc_scores(logits, log_prior).exp()).sum(dim=1)
        torch.testing.assert_close(total, torch.ones(64), rtol=0, atol=1e-6)


def test_shift_invariance() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 7, generator=gen, dtype=D64)
    log_prior = prior_from_counts([3, 1, 4, 1, 5, 9, 2]).double()
    shift = 100 * torch.randn(16, 1, generator=gen, dtype=D64)
    torch.testing.assert_close(log_pc_scores(logits + shift, log_prior), log_pc_scores(logits, log_prior))


# ---------------------------------------------------------------------------- test 4: switch-off


def test_uniform_prior_switches_pc_softmax_off() -> None:
    num_classes = 6
    log_prior = prior_from_counts([10, 200, 3, 40, 5, 60], kind="uniform")
    torch.testing.assert_close(log_prior, torch.full((num_classes,), -math.log(num_classes)))
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(32, num_classes, generator=gen)
    y = torch.randint(0, num_classes, (32,), generator=gen)
    pc = pc_softmax_loss(logits, y, log_prior)
    torch.testing.assert_close(pc, F.cross_entropy(logits, y) - math.log(num_classes), rtol=0, atol=1e-6)

    def train(loss_name: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            loss = pc_softmax_loss(out, y, log_prior) if loss_name == "pc" else F.cross_entropy(out, y)
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train("pc"), train("ce"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ test 5: logit adjustment


def test_equals_logit_adjusted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(4)
    log_prior = prior_from_counts([5, 10, 15, 20, 25]).double()
    base = torch.randn(40, 5, generator=gen, dtype=D64)
    y = torch.randint(0, 5, (40,), generator=gen)
    f1 = base.clone().requires_grad_(True)
    f2 = base.clone().requires_grad_(True)
    pc = pc_softmax_loss(f1, y, log_prior)
    adjusted = F.cross_entropy(f2 + log_prior, y) + log_prior[y].mean()
    torch.testing.assert_close(pc, adjusted)
    pc.backward()
    adjusted.backward()
    torch.testing.assert_close(f1.grad, f2.grad)
    # ∂L/∂f_k = (σ_k(f + π) − 1[k = y]) / B
    expected = (F.softmax(base + log_prior, dim=1) - F.one_hot(y, 5)) / 40
    torch.testing.assert_close(f1.grad, expected)


def test_reductions() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 4, generator=gen)
    y = torch.randint(0, 4, (9,), generator=gen)
    log_prior = prior_from_counts([1, 2, 3, 4])
    per_sample = pc_softmax_loss(logits, y, log_prior, reduction="none")
    assert per_sample.shape == (9,)
    torch.testing.assert_close(pc_softmax_loss(logits, y, log_prior, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(pc_softmax_loss(logits, y, log_prior), per_sample.mean())
    with pytest.raises(ValueError, match="reduction"):
        pc_softmax_loss(logits, y, log_prior, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_prior"):
        pc_softmax_loss(logits, y, log_prior[:3])


# ---------------------------------------------------------------------------- test 6: stability


def test_extreme_logits_are_finite_in_fp32() -> None:
    logits = torch.tensor([[1000.0, 0.0, -1000.0]], requires_grad=True)
    log_prior = prior_from_counts([1, 2, 1])
    for y in range(3):
        loss = pc_softmax_loss(logits, torch.tensor([y]), log_prior)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        sums = mi_terms(logits, torch.tensor([y]), log_prior, "ce")
        assert all(torch.isfinite(v) for v in sums.values())
    # The winning class: log s̃ = f_0 − (f_0 + π_0) = −π_0 = log 4.
    assert float(log_pc_scores(logits, log_prior)[0, 0]) == pytest.approx(math.log(4.0), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_upcast(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    logits = (8 * torch.randn(50, 10, generator=gen)).to(dtype)  # representable in `dtype` by construction
    y = torch.randint(0, 10, (50,), generator=gen)
    log_prior = prior_from_counts(torch.randint(1, 50, (10,), generator=gen))
    low = pc_softmax_loss(logits, y, log_prior)
    assert low.dtype == torch.float32
    assert log_pc_scores(logits, log_prior).dtype == torch.float32
    torch.testing.assert_close(low, pc_softmax_loss(logits.float(), y, log_prior), rtol=0, atol=1e-6)
    low_sums = mi_terms(logits, y, log_prior, "ce")
    full_sums = mi_terms(logits.float(), y, log_prior, "ce")
    for key in MI_TERM_KEYS:
        torch.testing.assert_close(low_sums[key], full_sums[key], rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------- test 7: prior


def test_prior_from_counts() -> None:
    torch.testing.assert_close(prior_from_counts([1, 3]), torch.tensor([0.25, 0.75]).log())
    assert prior_from_counts(torch.tensor([2, 2, 4])).dtype == torch.float32
    with pytest.raises(ValueError, match=r"classes \[1\] have no training sample"):
        prior_from_counts([4, 0, 3])
    with pytest.raises(ValueError, match="no training sample"):
        prior_from_counts([4, 0, 3], kind="uniform")
    with pytest.raises(ValueError, match="prior kind"):
        prior_from_counts([1, 2], kind="balanced")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        prior_from_counts([1, -2])


def test_mi_estimates_coincide_where_the_spec_says() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(200, 5, generator=gen, dtype=D64)
    y = torch.randint(0, 5, (200,), generator=gen)
    imbalanced = prior_from_counts([5, 10, 15, 20, 25]).double()
    pc_model = _mi(logits, y, imbalanced, "pc_softmax")
    assert pc_model["mi_ba"] == pc_model["mi_pc"]  # Î_BA ≡ Î_PC for PC-trained models, exactly
    ce_model = _mi(logits, y, imbalanced, "ce")
    # For a CE model, Î_BA = mean(log σ_y − π_y) = Î_bal − log K − mean π_y.
    expected_ba = ce_model["mi_bal"] - math.log(5) - float(imbalanced[y].mean())
    assert ce_model["mi_ba"] == pytest.approx(expected_ba, abs=1e-12)
    uniform = prior_from_counts([1] * 5, kind="uniform").double()
    for trained_with in ("ce", "pc_softmax"):
        mi = _mi(logits, y, uniform, trained_with)
        # Î_BA ≡ Î_bal for uniform p, up to the fp32 rounding of the stored prior −log K.
        assert mi["mi_ba"] == pytest.approx(mi["mi_bal"], abs=1e-7)
        assert mi["mi_pc"] == pytest.approx(mi["mi_bal"], abs=1e-7)


def test_mi_terms_are_batch_additive_and_gradient_free() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(30, 4, generator=gen, requires_grad=True)
    y = torch.randint(0, 4, (30,), generator=gen)
    log_prior = prior_from_counts([1, 2, 3, 4])
    whole = mi_terms(logits, y, log_prior, "ce")
    assert set(whole) == set(MI_TERM_KEYS)
    assert all(v.dtype == D64 and not v.requires_grad for v in whole.values())
    parts = [mi_terms(logits[s], y[s], log_prior, "ce") for s in (slice(0, 7), slice(7, 30))]
    for key in MI_TERM_KEYS:
        torch.testing.assert_close(parts[0][key] + parts[1][key], whole[key])
    assert float(whole["count"]) == 30
    assert float(whole["sum_log_pc"]) == pytest.approx(
        -float(pc_softmax_loss(logits, y, log_prior)) * 30, rel=1e-6
    )
    with pytest.raises(ValueError, match="trained_with"):
        mi_terms(logits, y, log_prior, "lade")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no samples"):
        mi_from_sums(0.0, 0.0, 0.0, 0, num_classes=4)


# ------------------------------------------------------------------- test 8 (first part): oracle


MEANS = (0.0, 2.0, -2.0, 4.0, -4.0)
IMBALANCED = (5, 10, 15, 20, 25)


def _gaussian_log_density(x: torch.Tensor, mean: float) -> torch.Tensor:
    d = x.shape[1]
    return -0.5 * ((x - mean) ** 2).sum(dim=1) - 0.5 * d * math.log(2 * math.pi)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_optimal_logits_give_the_true_pmi(dim: int) -> None:
    # Per-class counts in exact proportion to p, so the empirical label entropy is exactly H(Y).
    counts = [400 * c // 5 for c in IMBALANCED]
    p = torch.tensor(IMBALANCED, dtype=D64) / sum(IMBALANCED)
    gen = torch.Generator().manual_seed(dim)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    x = torch.randn(len(y), dim, generator=gen, dtype=D64) + torch.tensor(MEANS, dtype=D64)[y, None]

    torch.testing.assert_close(prior_from_counts(counts), p.log().float())
    log_prior = p.log()  # the float64 prior: this test checks identities to 1e-9
    logits = torch.stack([_gaussian_log_density(x, m) for m in MEANS], dim=1)  # f_k = log N(x; a_k 1, I)

    # True PMI from the densities, in the probability domain (fine at these dims in float64).
    density = (p * torch.stack([_gaussian_log_density(x, m).exp() for m in MEANS], dim=1)).sum(dim=1)
    true_pmi = logits.gather(1, y[:, None]).squeeze(1) - density.log()
    log_pc = log_pc_scores(logits, log_prior).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(log_pc, true_pmi, rtol=0, atol=1e-5)
    mi = _mi(logits, y, log_prior, "pc_softmax")
    assert mi["mi_pc"] == pytest.approx(float(true_pmi.mean()), abs=1e-5)  # the MC true MI

    # Posterior logits f + π: Î_bal(f + π) = Î_PC(f) + log K + mean_i log p_{y_i}.
    posterior = _mi(logits + log_prior, y, log_prior, "ce")
    mean_log_p = float(log_prior[y].mean())
    assert posterior["mi_bal"] == pytest.approx(mi["mi_pc"] + math.log(5) + mean_log_p, abs=1e-9)
    entropy = -float((p * p.log()).sum())
    assert mean_log_p == pytest.approx(-entropy, abs=1e-12)
    assert posterior["mi_bal"] - mi["mi_pc"] == pytest.approx(0.1197, abs=1e-4)  # log K − H(Y)
    # Î_BA of the posterior model is the true-PMI mean too, since q = p(y|x).
    assert posterior["mi_ba"] == pytest.approx(mi["mi_pc"], abs=1e-9)
