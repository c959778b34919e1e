"""The shared recipe (schedule, weight decay, EMA, metrics) and FixMatch's objective, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.components.ema import EMAWeights
from ssl_lightning.components.thresholds import FixedThreshold
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods import FixMatch, Supervised
from ssl_lightning.methods.base import cosine_factor, parameter_groups
from ssl_lightning.metrics.classification import NegativeLogLikelihood, classification_metrics


def test_cosine_schedule_values() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(100, 100) == pytest.approx(math.cos(7 * math.pi / 16))  # 0.19509
    assert cosine_factor(50, 100) == pytest.approx(math.cos(7 * math.pi / 32))
    assert [cosine_factor(k, 100, warmup_steps=4) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_factor(10**6, 100) == 0.0  # floored, never negative


def test_half_cosine_schedule_after_warm_up() -> None:
    """The ImageNet recipe: linear warm-up, then ½(1 + cos(π·progress)) over the remaining steps."""
    assert [cosine_factor(k, 104, warmup_steps=4, kind="half") for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_factor(4, 104, warmup_steps=4, kind="half") == 1.0
    assert cosine_factor(54, 104, warmup_steps=4, kind="half") == pytest.approx(0.5)
    assert cosine_factor(104, 104, warmup_steps=4, kind="half") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        cosine_factor(0, 10, kind="linear")


def test_weight_decay_skips_biases_and_every_norm_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[4].weight)}
    expected = {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].weight),
                id(model[2].bias), id(model[4].bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    # Recipes that decay every parameter (SimMatch's ImageNet) keep one decayed group.
    decay, no_decay = parameter_groups(model, 1e-4, exempt_norm_and_bias=False)
    assert len(decay["params"]) == 8 and not no_decay["params"]


def test_ema_update_is_exact_and_stays_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMAWeights(model, decay=0.9)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * before + 0.1 * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers are copied
    ema.train()
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.parameters())


def test_fixed_threshold() -> None:
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.01, 0.99]])
    labels, mask = FixedThreshold(0.95)(probs)
    assert labels.tolist() == [0, 0, 1] and mask.tolist() == [1.0, 0.0, 1.0]


def _batch(labeled: int, unlabeled: int, classes: int) -> dict[str, StreamBatch]:
    torch.manual_seed(0)
    return {
        "labeled": StreamBatch([torch.randn(labeled, 4)], torch.randint(0, classes, (labeled,)), torch.arange(labeled)),
        "unlabeled": StreamBatch([torch.randn(unlabeled, 4), torch.randn(unlabeled, 4)],
                                 torch.randint(0, classes, (unlabeled,)), torch.arange(unlabeled)),
    }


def test_fixmatch_loss_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FixMatch(num_classes=3, backbone="mlp", backbone_args={"in_features": 4}, lambda_u=2.0, threshold=0.9)
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    logits_l = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    logits_weak = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0], [1.0, 1.0, 1.0]])
    logits_strong = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    monkeypatch.setattr(model, "forward_views", lambda views: [logits_l, logits_weak, logits_strong])
    batch = _batch(2, 4, 3)
    batch["labeled"] = batch["labeled"]._replace(targets=torch.tensor([0, 1]))
    terms = model.compute_losses(batch)

    supervised = F.cross_entropy(logits_l, torch.tensor([0, 1]))
    # Samples 0 and 2 pass the 0.9 threshold with pseudo-labels 0 and 2; the mean is over all 4.
    unlabeled = (F.cross_entropy(logits_strong[0:1], torch.tensor([0]), reduction="sum")
                 + F.cross_entropy(logits_strong[2:3], torch.tensor([2]), reduction="sum")) / 4
    torch.testing.assert_close(terms["supervised_loss"], supervised)
    torch.testing.assert_close(terms["unlabeled_loss"], unlabeled)
    torch.testing.assert_close(terms["loss"], supervised + 2.0 * unlabeled)


def test_fixmatch_without_unlabeled_weight_is_supervised(monkeypatch: pytest.MonkeyPatch) -> None:
    # A BatchNorm-free network, so the joint forward pass cannot couple labeled and unlabeled logits.
    fixmatch = FixMatch(num_classes=3, backbone="mlp", backbone_args={"in_features": 4}, lambda_u=0.0)
    supervised = Supervised(num_classes=3, backbone="mlp", backbone_args={"in_features": 4})
    supervised.backbone.load_state_dict(fixmatch.backbone.state_dict())
    for module in (fixmatch, supervised):
        monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    batch = _batch(3, 6, 3)
    torch.testing.assert_close(fixmatch.compute_losses(batch)["loss"], supervised.compute_losses(batch)["loss"])


def test_nll_metric_matches_cross_entropy() -> None:
    logits, targets = torch.randn(50, 7), torch.randint(0, 7, (50,))
    metric = NegativeLogLikelihood()
    metric.update(logits[:20], targets[:20])
    metric.update(logits[20:], targets[20:])
    torch.testing.assert_close(metric.compute(), F.cross_entropy(logits, targets))


def test_classification_metrics_names() -> None:
    assert set(classification_metrics(10)) == {"acc", "acc_top5", "macro_f1", "ece", "nll"}
    assert set(classification_metrics(3)) == {"acc", "macro_f1", "ece", "nll"}


def test_ema_after_1000_updates_matches_closed_form() -> None:
    """InfoMatch spec T15: student at 1, EMA from 0, d = 0.999 → 1 − 0.999^1000 after 1,000 updates."""
    student = nn.Linear(2, 2)
    ema = EMAWeights(student, decay=0.999)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.zero_()
        for p in student.parameters():
            p.fill_(1.0)
    for _ in range(1000):
        ema.update(student)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 1 - 0.999**1000), atol=1e-5, rtol=0)
    assert float(ema.module.weight[0, 0]) == pytest.approx(0.632305, abs=1e-5)


def test_learning_rate_values_of_the_spec() -> None:
    """InfoMatch spec T16: lr(0) = 0.03, lr(K/2) = 0.0231903, lr(K) = 0.0058527."""
    K = 2**20
    assert [0.03 * cosine_factor(k, K) for k in (0, K // 2, K)] == pytest.approx([0.03, 0.0231903, 0.0058527],
                                                                                  abs=1e-7)


@pytest.mark.parametrize("name", ["wrn28_2", "resnet50"])
def test_weight_decay_groups_on_real_backbones(name: str) -> None:
    """InfoMatch spec T17: every conv/linear weight decays; every bias and norm parameter does not,
    including ResNet-50's ``downsample`` BatchNorm, which name-based rules miss."""
    from ssl_lightning.nets import build_backbone

    model = build_backbone(name, num_classes=10)
    decay, no_decay = (set(map(id, group["params"])) for group in parameter_groups(model, 5e-4))
    for module in model.modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            is_weight = isinstance(module, nn.Conv2d | nn.Linear) and param_name == "weight"
            assert (id(parameter) in decay) == is_weight
            assert (id(parameter) in no_decay) == (not is_weight)
    downsample_bn = [m for n, m in model.named_modules() if "downsample" in n and isinstance(m, nn.BatchNorm2d)]
    assert name == "wrn28_2" or downsample_bn
    assert all(id(m.weight) in no_decay for m in downsample_bn)
