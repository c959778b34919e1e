"""The InfoCAM/PC-softmax module (infocam spec §3.1, §4, §8 test 4): the training prior, the switch-off to
CE under a uniform prior, and the validation-selected box threshold."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods import InfoCAM
from ssl_lightning.methods.infocam import PriorMismatchError


def _model(**kwargs: object) -> InfoCAM:
    torch.manual_seed(0)
    return InfoCAM(num_classes=3, in_channels=1, image_size=4, backbone="mlp", lr=0.1, **kwargs)


def _attach(model: InfoCAM, counts: list[int]) -> None:
    datamodule = SimpleNamespace(class_counts=lambda: torch.tensor(counts), eval_streams=["val", "test"])
    model._trainer = SimpleNamespace(datamodule=datamodule, sanity_checking=False)  # type: ignore[assignment]


def _batch() -> dict[str, StreamBatch]:
    generator = torch.Generator().manual_seed(2)
    return {"labeled": StreamBatch([torch.randn(6, 1, 4, 4, generator=generator)],
                                   torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))}


def test_prior_comes_from_the_training_counts() -> None:
    model = _model(loss="pc_softmax")
    _attach(model, [1, 2, 1])
    model.setup("fit")
    torch.testing.assert_close(model.log_prior.exp(), torch.tensor([0.25, 0.5, 0.25]))


def test_uniform_prior_makes_pc_softmax_cross_entropy_minus_log_k_and_trains_identically() -> None:
    pc, ce = _model(loss="pc_softmax", prior="uniform"), _model(loss="ce")
    for model in (pc, ce):
        _attach(model, [5, 1, 2])
        model.setup("fit")
    batch = _batch()
    difference = pc.compute_losses(batch)["loss"] - ce.compute_losses(batch)["loss"]
    assert float(difference) == pytest.approx(-math.log(3), abs=1e-6)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (pc, ce)]
    for _ in range(3):
        for model, optimizer in zip((pc, ce), optimizers, strict=True):
            optimizer.zero_grad()
            model.compute_losses(batch)["loss"].backward()
            optimizer.step()
    for a, b in zip(pc.backbone.parameters(), ce.backbone.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resuming_with_a_different_training_prior_is_refused() -> None:
    model = _model(loss="pc_softmax")
    _attach(model, [1, 1, 2])
    model.setup("fit")
    saved = {"state_dict": {"log_prior": torch.log(torch.tensor([0.5, 0.25, 0.25]))}}
    with pytest.raises(PriorMismatchError, match="prior"):
        model.on_load_checkpoint(saved)
    model.on_load_checkpoint({"state_dict": {"log_prior": model.log_prior.clone()}, "selected_thresholds": {}})


def test_test_reports_top1_loc_at_the_threshold_selected_on_val() -> None:
    model = _model()
    _attach(model, [1, 1, 1])
    model.variants = ["mean_others_k3"]
    val = {"count": 10.0, "mean_others_k3/gt_known_loc": 0.5, "mean_others_k3/max_box_acc": 0.8,
           "mean_others_k3/best_threshold": 0.35}
    values = model._localization_values("val", val)
    assert values["mean_others_k3/best_threshold"] == 0.35 and model.selected_thresholds == {"mean_others_k3": 0.35}
    test = {"count": 10.0, "mean_others_k3/top1_loc": 0.4, "mean_others_k3/max_box_acc": 0.9,
            "mean_others_k3/gt_known_loc@0.35": 0.75, "mean_others_k3/top1_loc@0.35": 0.7,
            "mean_others_k3/top1_loc@0.20": 0.4}
    values = model._localization_values("test", test)
    assert values["mean_others_k3/top1_loc_val_tau"] == 0.7 and values["mean_others_k3/val_tau"] == 0.35
    assert values["mean_others_k3/max_box_acc_oracle"] == 0.9  # the maximum over τ on test is an oracle
    assert "mean_others_k3/top1_loc@0.35" not in values
