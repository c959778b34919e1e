"""Exponential moving average of a model's weights, used for evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAWeights(nn.Module):
    """A frozen copy of ``model`` whose parameters track ``decay·ema + (1−decay)·param``.

    Buffers (BatchNorm statistics) follow ``buffers``:

    - ``copy`` (default, TorchSSL/USB): copied from the model; its running statistics are already averages.
    - ``average``: floating buffers are averaged like the parameters (EMAN), integer ones copied.
    - ``own``: left alone; the copy keeps the statistics of its own train-mode forwards (a teacher
      network, as in SimMatch's ImageNet recipe).

    The copy is a submodule, so it is checkpointed and moved between devices with its owner; its
    parameters do not require gradients, so no optimiser sees them.
    """

    BUFFER_POLICIES = ("copy", "average", "own")

    def __init__(self, model: nn.Module, decay: float, buffers: str = "copy") -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if buffers not in self.BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {self.BUFFER_POLICIES}, got {buffers!r}")
        self.decay = decay
        self.buffers_policy = buffers
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
        if self.buffers_policy == "own":
            return
        pairs = list(zip(self.module.buffers(), model.buffers(), strict=True))
        averaged = [(e, b) for e, b in pairs if self.buffers_policy == "average" and e.is_floating_point()]
        copied = [(e, b) for e, b in pairs if not (self.buffers_policy == "average" and e.is_floating_point())]
        if averaged:
            torch._foreach_lerp_([e for e, _ in averaged], [b for _, b in averaged], 1.0 - self.decay)
        if copied:
            torch._foreach_copy_([e for e, _ in copied], [b for _, b in copied])

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.module(*args, **kwargs)
