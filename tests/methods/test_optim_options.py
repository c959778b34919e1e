"""Optimiser options the clustering and localisation recipes need: Adam with coupled L2, constant and
multi-step schedules, and per-prefix learning-rate multipliers."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.methods import Supervised
from ssl_lightning.methods.base import cosine_factor


class _Trainer:
    max_steps = 100


def _optimizer(**kwargs: object) -> tuple[torch.optim.Optimizer, Supervised]:
    model = Supervised(num_classes=3, in_channels=1, image_size=16, backbone="small_cnn", ema_decay=None, **kwargs)
    model._trainer = _Trainer()  # type: ignore[assignment]  # configure_optimizers reads max_steps only
    return model.configure_optimizers()["optimizer"], model


def test_schedules() -> None:
    assert cosine_factor(50, 100, kind="constant") == 1.0
    assert cosine_factor(3, 100, warmup_steps=10, kind="constant") == pytest.approx(0.4)
    factors = [cosine_factor(s, 100, kind="multistep", milestones=(10, 20), gamma=0.1) for s in (0, 9, 10, 19, 20)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_adam_uses_coupled_weight_decay_on_weights_only() -> None:
    optimizer, _ = _optimizer(optimizer="adam", weight_decay=0.01, lr=1e-3)
    assert type(optimizer) is torch.optim.Adam
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]


def test_lr_multipliers_split_groups_by_longest_prefix() -> None:
    optimizer, model = _optimizer(lr=0.01, lr_multipliers={"backbone": 2.0, "backbone.head": 10.0})
    head = {id(p) for p in model.backbone.head.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # no group mixes head and trunk
        assert group["lr"] == pytest.approx(0.1 if in_head.pop() else 0.02)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_lr_multiplier_prefix_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="match no parameter"):
        _optimizer(lr_multipliers={"backbone.classifier": 10.0})
