"""Exponential moving average of a model's weights, used for evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAWeights(nn.Module):
    """A frozen copy of ``model`` whose parameters track ``decay·ema + (1−decay)·param``.

    Buffers (BatchNorm statistics) are copied, not averaged, as in TorchSSL/USB: the raw model's
    running statistics are already averages. The copy is a submodule, so it is checkpointed and moved
    between devices with its owner; its parameters do not require gradients, so no optimiser sees them.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMAWeights:
        # The averaged copy is only ever evaluated; keep its BatchNorm layers in inference mode.
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        # One fused kernel over all tensors: ema ← ema + (1 − decay)(param − ema).
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        ema_buffers, buffers = list(self.module.buffers()), list(model.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.module(*args, **kwargs)
