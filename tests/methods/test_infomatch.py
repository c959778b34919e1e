"""InfoMatch's objective as a whole: weights, gradient flow, warm-up and reduction to FixMatch (spec §8)."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods import FixMatch, InfoMatch
from ssl_lightning.methods import infomatch as infomatch_module
from ssl_lightning.methods.infomatch import ThresholdConfig
from tests.helpers import capture_backbone_logits

MLP = {"backbone": "mlp", "backbone_args": {"in_features": 3 * 8 * 8}}


def _batch(labeled: int = 4, unlabeled: int = 6, classes: int = 5, seed: int = 0) -> dict[str, StreamBatch]:
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 8, 8, generator=generator)

    return {
        "labeled": StreamBatch([images(labeled)], torch.randint(0, classes, (labeled,), generator=generator),
                               torch.arange(labeled)),
        "unlabeled": StreamBatch([images(unlabeled) for _ in range(3)],
                                 torch.randint(0, classes, (unlabeled,), generator=generator), torch.arange(unlabeled)),
    }


def _quiet(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)


def test_total_weights_with_unit_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """T13: every term equal to 1 gives L = 1 + 2·(0.5 + 0.25 + 0.25 + 0.001) = 3.002."""
    model = InfoMatch(num_classes=5, **MLP)
    _quiet(model, monkeypatch)
    one = lambda *args, **kwargs: torch.tensor(1.0)  # noqa: E731
    for name in ("cross_entropy", "masked_cross_entropy", "cutmix_cross_entropy", "zscore_mse"):
        monkeypatch.setattr(infomatch_module, name, one)
    assert float(model.compute_losses(_batch())["loss"]) == pytest.approx(3.002)


def test_reduces_to_fixmatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """T13: λ_u=1, w_s=(1,0), w_cm=0, w_mi=0 and a fixed 0.95 threshold is FixMatch on the same batch."""
    infomatch = InfoMatch(num_classes=5, lambda_u=1.0, w_strong=(1.0, 0.0), w_cutmix=0.0, w_mi=0.0,
                          threshold=ThresholdConfig(mode="fixed", value=0.95), **MLP)
    fixmatch = FixMatch(num_classes=5, lambda_u=1.0, threshold=0.95, **MLP)
    fixmatch.backbone.load_state_dict(infomatch.backbone.state_dict())
    for module in (infomatch, fixmatch):
        _quiet(module, monkeypatch)
    batch = _batch()
    # Scale the weak view so some pseudo-labels pass 0.95 and some do not.
    weak, strong_1, strong_2 = batch["unlabeled"].views
    batch["unlabeled"] = batch["unlabeled"]._replace(views=[weak * 30, strong_1, strong_2])
    fixmatch_batch = {"labeled": batch["labeled"],
                      "unlabeled": batch["unlabeled"]._replace(views=[weak * 30, strong_1])}
    torch.testing.assert_close(infomatch.compute_losses(batch)["loss"], fixmatch.compute_losses(fixmatch_batch)["loss"])


def test_gradient_flow_by_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """T12: no gradient reaches the weak-view logits; every other view's logits get one."""
    model = InfoMatch(num_classes=5, threshold=ThresholdConfig(mode="fixed", value=0.0), **MLP)
    _quiet(model, monkeypatch)
    captured = capture_backbone_logits(model, monkeypatch)
    model.compute_losses(_batch(labeled=4, unlabeled=6))["loss"].backward()
    labeled, weak, mixed, strong_1, strong_2 = captured["logits"].grad.split([4, 6, 6, 6, 6])
    assert torch.count_nonzero(weak) == 0
    for part in (labeled, mixed, strong_1, strong_2):
        assert torch.count_nonzero(part) > 0


def test_supervised_warmup_skips_unlabeled_and_sat(monkeypatch: pytest.MonkeyPatch) -> None:
    model = InfoMatch(num_classes=5, sup_warmup_steps=1, **MLP)
    _quiet(model, monkeypatch)
    before = model.pseudo_labeler.global_threshold.clone()
    terms = model.compute_losses(_batch())
    assert set(terms) == {"loss", "supervised_loss"}
    assert torch.equal(model.pseudo_labeler.global_threshold, before)


def test_infonce_option_builds_head_and_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    model = InfoMatch(num_classes=5, mi_estimator="infonce", w_mi=0.05, **MLP)
    _quiet(model, monkeypatch)
    assert model.projection is not None
    model.compute_losses(_batch())["loss"].backward()
    assert all(p.grad is not None for p in model.projection.parameters())
    assert InfoMatch(num_classes=5, **MLP).projection is None


def test_sat_state_is_checkpointed_as_fp32_buffers() -> None:
    state = InfoMatch(num_classes=5, **MLP).state_dict()
    for key in ("pseudo_labeler.global_threshold", "pseudo_labeler.class_marginal"):
        assert state[key].dtype == torch.float32
