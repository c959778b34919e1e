"""EMA weights: the parameter update and the three BatchNorm-buffer policies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_lightning.components.ema import EMAWeights


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("policy", ["copy", "average", "own"])
def test_parameters_follow_the_average_and_buffers_follow_the_policy(policy: str) -> None:
    torch.manual_seed(0)
    model = _net()
    ema = EMAWeights(model, decay=0.9, buffers=policy)
    before_params = [p.clone() for p in ema.module.parameters()]
    before_buffers = [b.clone() for b in ema.module.buffers()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # train-mode forward: the model's running statistics move
    ema.update(model)
    for averaged, old, new in zip(ema.module.parameters(), before_params, model.parameters(), strict=True):
        torch.testing.assert_close(averaged, 0.9 * old + 0.1 * new)
    bn, ema_bn = model[1], ema.module[1]
    if policy == "copy":
        assert torch.equal(ema_bn.running_mean, bn.running_mean)
    elif policy == "average":
        torch.testing.assert_close(ema_bn.running_mean, 0.9 * before_buffers[0] + 0.1 * bn.running_mean)
        assert ema_bn.num_batches_tracked == bn.num_batches_tracked  # integers are copied
    else:
        assert all(torch.equal(a, b) for a, b in zip(ema.module.buffers(), before_buffers, strict=True))


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="buffers"):
        EMAWeights(_net(), 0.9, buffers="mean")
