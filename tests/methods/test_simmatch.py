"""SimMatch's objective as a whole: reduction to FixMatch + DA, warm-up, gradient flow, teachers (spec §8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods import SimMatch
from tests.helpers import capture_backbone_logits

MLP = {"backbone": "mlp", "backbone_args": {"in_features": 3 * 8 * 8}}
CNN = {"backbone": "small_cnn", "backbone_args": {}, "in_channels": 3, "image_size": 8}


def _batch(labeled: int = 4, unlabeled: int = 6, classes: int = 5, seed: int = 0,
           weak_scale: float = 1.0) -> dict[str, StreamBatch]:
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 8, 8, generator=generator)

    return {
        "labeled": StreamBatch([images(labeled)], torch.arange(labeled) % classes, torch.arange(labeled) * 3),
        "unlabeled": StreamBatch([weak_scale * images(unlabeled), images(unlabeled)],
                                 torch.randint(0, classes, (unlabeled,), generator=generator), torch.arange(unlabeled)),
    }


def _model(monkeypatch: pytest.MonkeyPatch, labeled: int = 4, classes: int = 5, **kwargs) -> SimMatch:
    model = SimMatch(num_classes=classes, **{**MLP, **kwargs})
    model.bank.reset(torch.arange(labeled) * 3, torch.arange(labeled) % classes, seed=0)
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    return model


def _step(model: SimMatch, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
    """compute_losses, then the post-step state updates (EMA, bank) as the training loop runs them."""
    terms = model.compute_losses(batch)
    model.on_train_batch_end(None, batch, 0)
    return terms


@pytest.mark.parametrize("da", [True, False])
def test_alpha_one_without_instance_loss_is_fixmatch_with_soft_aligned_targets(
    monkeypatch: pytest.MonkeyPatch, da: bool
) -> None:
    """T-FIXMATCH: α = 1, λ_in = 0: L = L_s + λ_u · mean_b 1[max p̃ ≥ τ] H(p̃, σ(ℓ^s)); da=false gives p̃ = p^w."""
    model = _model(monkeypatch, alpha=1.0, lambda_in=0.0, lambda_u=1.5, da=da, instance_warmup_steps=0)
    batch = _batch(weak_scale=20.0)
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    logits = model.backbone(torch.cat([labeled.views[0], *unlabeled.views]))
    logits_l, logits_weak, logits_strong = logits.split([4, 6, 6])
    weak_probs = logits_weak.detach().softmax(dim=1)
    aligned = weak_probs / weak_probs.mean(dim=0) if da else weak_probs  # window = this batch only
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    # A threshold between two confidences exercises both sides of the mask.
    confidences = aligned.max(dim=1).values.sort().values
    model.threshold = float(confidences[2:4].mean())
    mask = (aligned.max(dim=1).values >= model.threshold).float()
    assert 0 < mask.sum() < 6
    loss = model.compute_losses(batch)["loss"]
    per_sample = -(aligned * logits_strong.log_softmax(dim=1)).sum(dim=1)
    expected = F.cross_entropy(logits_l, labeled.targets) + 1.5 * (mask * per_sample).mean()
    torch.testing.assert_close(loss, expected)


def test_warm_up_skips_propagation_and_instance_loss_but_updates_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """T-WARM: for k < T_w no L_in (finite even at t = 1e-6), p̂ = p̃; the DA window and bank still move."""
    model = _model(monkeypatch, instance_warmup_steps=1, temperature=1e-6)
    calls: list[int] = []
    from ssl_lightning.methods import simmatch as simmatch_module

    original = simmatch_module.propagate
    monkeypatch.setattr(simmatch_module, "propagate", lambda *a, **k: calls.append(1) or original(*a, **k))
    bank_before, window_before = model.bank.embeddings.clone(), model.alignment.rows.clone()
    terms = _step(model, _batch())
    assert "instance_loss" not in terms and calls == []
    assert torch.isfinite(terms["loss"])
    assert not torch.equal(model.bank.embeddings, bank_before)
    assert not torch.equal(model.alignment.rows, window_before)
    # The projection head stays in the graph (a finite zero), so DDP sees no unused parameter.
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.projection.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.projection.parameters())

    monkeypatch.setattr(SimMatch, "global_step", property(lambda self: 1))
    terms = _step(model, _batch(seed=1))
    assert "instance_loss" in terms and calls == [1]


def test_gradient_flow_online_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """T-GRAD: the weak view's logits and embeddings get no gradient; the bank never does; the head
    learns through L_in alone."""
    model = _model(monkeypatch, instance_warmup_steps=0, threshold=0.0)
    captured = capture_backbone_logits(model, monkeypatch)
    terms = model.compute_losses(_batch())
    terms["loss"].backward(retain_graph=True)
    labeled, weak, strong = captured["logits"].grad.split([4, 6, 6])
    assert torch.count_nonzero(weak) == 0 and torch.count_nonzero(labeled) > 0 and torch.count_nonzero(strong) > 0
    assert model.bank.embeddings.grad is None and not model.bank.embeddings.requires_grad
    model.zero_grad()
    (terms["supervised_loss"] + terms["unlabeled_loss"]).backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.projection.parameters())


def test_ema_teacher_gets_no_gradient_and_keeps_its_own_batchnorm_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """T-GRAD / T-EMA, ema mode: the teacher is a separate network; its BN statistics come from its own
    train-mode forwards, never from the student; its weights follow θ_e ← m θ_e + (1 − m) θ."""
    model = _model(monkeypatch, teacher="ema", teacher_bn="local", ema_decay=0.9, instance_warmup_steps=0, **CNN)
    teacher = model.ema.module
    bn = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    student_bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    teacher_mean_before = bn.running_mean.clone()
    teacher_params_before = [p.clone() for p in teacher.parameters()]
    terms = model.compute_losses(_batch())
    assert not torch.equal(bn.running_mean, teacher_mean_before)  # its own train-mode forward
    assert not teacher.training  # back to evaluation mode
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in model.teacher_projection.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    teacher_mean = bn.running_mean.clone()
    model.on_train_batch_end(None, None, 0)
    for ema, before, student in zip(teacher.parameters(), teacher_params_before, model.backbone.parameters(),
                                    strict=True):
        torch.testing.assert_close(ema, 0.9 * before + 0.1 * student)
    assert torch.equal(bn.running_mean, teacher_mean)
    assert not torch.equal(bn.running_mean, student_bn.running_mean)


def test_online_teacher_evaluation_weights_copy_batchnorm_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """T-EMA, online mode: the EMA copy is for evaluation and copies the student's BN buffers."""
    model = _model(monkeypatch, ema_decay=0.9, **CNN)
    _step(model, _batch())
    for ema, student in zip(model.ema.module.buffers(), model.backbone.buffers(), strict=True):
        assert torch.equal(ema, student)


def test_configuration_checks_and_epass_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _model(monkeypatch).method_name == "simmatch"
    epass = _model(monkeypatch, epass_heads=3)
    assert epass.method_name == "simmatch_epass" and len(epass.projection.heads) == 3
    with pytest.raises(ValueError, match="ema_decay"):
        SimMatch(num_classes=5, teacher="ema", ema_decay=None, eval_weights="student", **MLP)
    with pytest.raises(ValueError, match="alpha"):
        SimMatch(num_classes=5, alpha=1.5, **MLP)
    assert SimMatch(num_classes=5, eval_weights="student", **MLP).headline_weights == "raw"


def test_bank_labels_and_slots_come_from_the_labeled_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches carry pool indices; the bank writes at the slot of each index within the labeled subset."""
    model = _model(monkeypatch)
    batch = _batch()  # labeled pool indices 0, 3, 6, 9 → slots 0..3
    model.bank.visited.zero_()
    _step(model, batch)
    assert model.bank.visited.all()
    bad = {**batch, "labeled": batch["labeled"]._replace(indices=torch.tensor([0, 1, 2, 3]))}
    model.compute_losses(bad)
    with pytest.raises(IndexError, match="not in the labeled subset"):
        model.on_train_batch_end(None, bad, 0)
