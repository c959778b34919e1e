"""uwbssl's objective: golden L_u, reductions and switches, gradient flow, state (specs/bhattacharyya.md §8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.components.distribution_alignment import EMADistributionAlignment
from ssl_lightning.components.entropy_mask import EntropyMask
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.uncertainty import uwbssl_unlabeled_loss
from ssl_lightning.methods import UWBSSL, FixMatch
from ssl_lightning.methods.uwbssl import AlignmentConfig, EntropyMaskConfig

D64 = torch.float64
MLP = {"backbone": "mlp", "backbone_args": {"in_features": 3 * 8 * 8}, "schedule_steps": 100}

# Test 7's setting: C = 3, μB = 4, τ = 0.9, T = 0.5, λ_B = 1, ε = 0.8 given, DA off.
GOLDEN_Q = torch.tensor([[0.96, 0.02, 0.02], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]], dtype=D64)
GOLDEN_P = torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.2, 0.5, 0.3]], dtype=D64)


def _golden(**switches) -> float:
    log_q = GOLDEN_Q.log()
    entropy = -(GOLDEN_Q * log_q).sum(dim=1) / math.log(3)
    mask = (entropy <= 0.8).to(D64)
    if switches.pop("nomask", False):
        mask = torch.ones(4, dtype=D64)
    settings = {"threshold": 0.9, "temperature": 0.5, "lambda_b": 1.0, **switches}
    terms = uwbssl_unlabeled_loss(log_q, GOLDEN_P.log(), mask, **settings)
    return float(terms.loss)


def test_golden_intermediates() -> None:
    terms = uwbssl_unlabeled_loss(GOLDEN_Q.log(), GOLDEN_P.log(), torch.tensor([1.0, 1, 0, 0], dtype=D64),
                                  threshold=0.9, temperature=0.5)
    torch.testing.assert_close(terms.entropy, torch.tensor([0.1781, 0.7298, 0.9372, 0.9999], dtype=D64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(terms.weight, torch.tensor([0.5855, 0.7887, 0.2353, 0.0004], dtype=D64),
                               atol=1e-4, rtol=0)
    assert terms.confident.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("switches,expected", [
    ({}, 0.241937),
    ({"weight_mode": "literal", "confident_bypass": False}, 0.218816),
    ({"nomask": True}, 0.302285),
    ({"weight_mode": "none"}, 0.298085),
    ({"kind": "kl"}, 0.312592),
])
def test_golden_unlabeled_loss(switches: dict, expected: float) -> None:
    """Test 7: the spec's golden L_u for each variant."""
    assert _golden(**switches) == pytest.approx(expected, abs=1e-6)


def test_golden_fixmatch_preset() -> None:
    assert _golden(weight_mode="conf_only", lambda_b=0.0) == pytest.approx(0.055786, abs=1e-6)


def test_fixmatch_preset_equals_an_independent_fixmatch_loss_and_ignores_the_entropy_state() -> None:
    """Test 10: hard labels, τ mask, mean over all μB; any entropy mask gives the same loss."""
    generator = torch.Generator().manual_seed(0)
    weak = 4 * torch.randn(32, 10, generator=generator, dtype=D64)
    strong = torch.randn(32, 10, generator=generator, dtype=D64)
    probs = weak.softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    expected = ((confidence >= 0.95).to(D64) * F.cross_entropy(strong, labels, reduction="none")).mean()
    for scrambled in (torch.zeros(32, dtype=D64), torch.ones(32, dtype=D64), torch.rand(32, generator=generator) > 0.5):
        terms = uwbssl_unlabeled_loss(weak.log_softmax(dim=1), strong, scrambled.to(D64), threshold=0.95,
                                      temperature=0.5, lambda_b=0.0, weight_mode="conf_only")
        torch.testing.assert_close(terms.loss, expected)


def test_reduction_is_over_all_samples_and_empty_gate_is_zero_not_nan() -> None:
    """Test 8."""
    log_q, log_p = GOLDEN_Q.log(), GOLDEN_P.log()
    mask = torch.tensor([1.0, 1, 0, 0], dtype=D64)
    base = uwbssl_unlabeled_loss(log_q, log_p, mask, threshold=0.9).loss
    extra_q = torch.full((2, 3), 1 / 3, dtype=D64).log()  # uniform: e = 1, never gated
    padded = uwbssl_unlabeled_loss(torch.cat([log_q, extra_q]), torch.cat([log_p, log_p[:2]]),
                                   torch.cat([mask, torch.zeros(2, dtype=D64)]), threshold=0.9).loss
    torch.testing.assert_close(padded, base * 4 / 6)
    logits = log_p.clone().requires_grad_(True)
    empty = uwbssl_unlabeled_loss(log_q, logits, torch.zeros(4, dtype=D64), threshold=1.01, confident_bypass=False)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_switches_change_what_they_should() -> None:
    """Test 9: λ_B = 0 removes the divergence kind; τ and T each change L_u (T is not inert)."""
    generator = torch.Generator().manual_seed(1)
    weak = (3 * torch.randn(16, 5, generator=generator, dtype=D64)).log_softmax(dim=1)
    strong = torch.randn(16, 5, generator=generator, dtype=D64)
    mask = torch.ones(16, dtype=D64)
    losses = {kind: uwbssl_unlabeled_loss(weak, strong, mask, lambda_b=0.0, kind=kind).loss
              for kind in ("bhattacharyya", "kl", "js", "hellinger", "tv")}
    assert len({float(v) for v in losses.values()}) == 1
    base = uwbssl_unlabeled_loss(weak, strong, mask).loss
    assert uwbssl_unlabeled_loss(weak, strong, mask, threshold=0.8).loss != base
    assert uwbssl_unlabeled_loss(weak, strong, mask, temperature=1.0).loss != base
    none = uwbssl_unlabeled_loss(weak, strong, mask, weight_mode="none")
    assert torch.equal(none.ce_weight, torch.ones(16, dtype=D64))


def test_entropy_statistics_golden_update_and_threshold() -> None:
    """Test 6: momentum 0.9, μ = 0.5, σ = 0.2, e = [0.1, 0.2, 0.3, 0.6]."""
    batch = torch.tensor([0.1, 0.2, 0.3, 0.6])
    mask = EntropyMask(momentum=0.9, k_start=1.0, k_end=1.0, clamp_mode="never")
    mask.mean.fill_(0.5), mask.spread.fill_(0.2), mask.initialised.fill_(True)
    gate, epsilon = mask(batch, step=0, total_steps=10)
    assert float(mask.mean) == pytest.approx(0.48) and float(mask.sigma) == pytest.approx(0.201602, abs=1e-6)
    assert float(epsilon) == pytest.approx(0.681602, abs=1e-6) and gate.tolist() == [1, 1, 1, 1]
    half = EntropyMask(momentum=0.9, k_start=0.5, k_end=0.5, clamp_mode="never")
    half.mean.fill_(0.5), half.spread.fill_(0.2), half.initialised.fill_(True)
    gate, epsilon = half(batch, step=0, total_steps=10)
    assert float(epsilon) == pytest.approx(0.580801, abs=1e-6) and gate.tolist() == [1, 1, 1, 0]
    var = EntropyMask(momentum=0.9, sigma_mode="ema_var")
    var.mean.fill_(0.5), var.spread.fill_(0.04), var.initialised.fill_(True)
    var.update(batch)
    assert float(var.sigma) == pytest.approx(0.201660, abs=1e-6)


def test_entropy_threshold_clamp_schedule_and_first_batch_init() -> None:
    mask = EntropyMask(momentum=0.9, k_start=1.0, k_end=1.0, clamp_ratio=0.05)
    mask.mean.fill_(0.9), mask.spread.fill_(0.1), mask.initialised.fill_(True)
    assert float(mask.threshold(step=4, total_steps=100)) == pytest.approx(0.8)  # clamped early
    assert float(mask.threshold(step=5, total_steps=100)) == pytest.approx(1.0)  # the window is over
    ramp = EntropyMask(k_start=1.0, k_end=2.0, k_ramp=0.5)
    ks = [ramp.k(t, 100) for t in range(0, 120, 10)]
    assert ks[0] == 1.0 and ks == sorted(ks) and ramp.k(50, 100) == 2.0 and ramp.k(99, 100) == 2.0
    fresh = EntropyMask(momentum=0.9)
    fresh.update(torch.tensor([0.1, 0.2, 0.3, 0.6]))
    assert float(fresh.mean) == pytest.approx(0.3) and float(fresh.sigma) == pytest.approx(0.216025, abs=1e-6)


def test_ema_distribution_alignment() -> None:
    """Test 11: π = p̄ is the identity; rows sum to 1; p̄ starts at the first batch, then an EMA of the
    pre-alignment probabilities."""
    da = EMADistributionAlignment(3, momentum=0.9)
    first = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    da.update(first)
    torch.testing.assert_close(da.mean_prediction, first.mean(dim=0))
    second = torch.tensor([[1.0, 0.0, 0.0]])
    da.update(second)
    torch.testing.assert_close(da.mean_prediction, 0.9 * first.mean(dim=0) + 0.1 * second[0])
    log_q = torch.randn(5, 3).log_softmax(dim=1)
    torch.testing.assert_close(da.log_align(log_q).exp().sum(dim=1), torch.ones(5))
    da.target.copy_(da.mean_prediction)
    torch.testing.assert_close(da.log_align(log_q), log_q, atol=1e-5, rtol=0)


def _batch(seed: int = 0, weak_scale: float = 1.0) -> dict[str, StreamBatch]:
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 8, 8, generator=generator)

    return {
        "labeled": StreamBatch([images(4)], torch.arange(4) % 5, torch.arange(4)),
        "unlabeled": StreamBatch([weak_scale * images(6), images(6)], torch.randint(0, 5, (6,), generator=generator),
                                 torch.arange(6)),
    }


def _model(monkeypatch: pytest.MonkeyPatch, **kwargs) -> UWBSSL:
    model = UWBSSL(num_classes=5, **{**MLP, **kwargs})
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    return model


def test_fixmatch_preset_of_the_module_equals_the_fixmatch_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test 10 at module level: the preset and the framework's FixMatch give the same loss on one batch."""
    preset = _model(monkeypatch, weight_mode="conf_only", lambda_b=0.0, threshold=0.6)
    fixmatch = FixMatch(num_classes=5, threshold=0.6, **MLP)
    monkeypatch.setattr(fixmatch, "log_dict", lambda *a, **k: None)
    fixmatch.backbone.load_state_dict(preset.backbone.state_dict())
    batch = _batch(weak_scale=20.0)
    torch.testing.assert_close(preset.compute_losses(batch)["loss"], fixmatch.compute_losses(batch)["loss"])


def test_weak_view_gets_no_gradient_and_split_forward_equals_concat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests 5 and 14: L_u gives no gradient to z^w; with drop-path 0 a LayerNorm ViT's split no-grad weak
    forward and the concatenated forward give identical gradients."""
    vit = {"backbone": "vit_tiny", "backbone_args": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
           "image_size": 8, "schedule_steps": 100}
    split = UWBSSL(num_classes=5, weak_forward="split", threshold=0.3, **vit)
    concat = UWBSSL(num_classes=5, weak_forward="concat", threshold=0.3, **vit)
    concat.load_state_dict(split.state_dict())
    grads = []
    for model in (split, concat):
        monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
        model.compute_losses(_batch(weak_scale=5.0))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None})
    assert split.split_forward and not concat.split_forward and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_batchnorm_backbones_refuse_the_split_forward() -> None:
    with pytest.raises(ValueError, match="concat"):
        UWBSSL(num_classes=5, backbone="small_cnn", backbone_args={}, in_channels=3, image_size=8, weak_forward="split")
    assert not UWBSSL(num_classes=5, backbone="small_cnn", backbone_args={}, in_channels=3, image_size=8).split_forward


def test_state_updates_only_when_training_the_unlabeled_term(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(monkeypatch, da=AlignmentConfig(enabled=True), mask=EntropyMaskConfig(momentum=0.5))
    model.compute_losses(_batch())
    assert bool(model.entropy_mask.initialised) and bool(model.alignment.initialised)
    floor = _model(monkeypatch, lambda_u=0.0)
    assert floor.unlabeled_views == []
    terms = floor.compute_losses({"labeled": _batch()["labeled"]})
    assert set(terms) == {"loss", "supervised_loss"} and not bool(floor.entropy_mask.initialised)


def test_parameter_groups_exempt_vit_position_embedding_and_class_token() -> None:
    from ssl_lightning.methods.base import parameter_groups

    model = UWBSSL(num_classes=5, backbone="vit_tiny", image_size=8,
                   backbone_args={"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    decay, no_decay = parameter_groups(model, 5e-4)
    exempt = {id(p) for p in no_decay["params"]}
    encoder = model.backbone.encoder
    assert id(encoder.pos_embed) in exempt and id(encoder.cls_token) in exempt
    assert id(encoder.patch_embed.proj.weight) in {id(p) for p in decay["params"]}
