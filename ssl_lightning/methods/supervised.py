"""Supervised baseline: cross-entropy on the labeled stream only."""

from __future__ import annotations

from typing import ClassVar

import torch

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods.base import Method, cross_entropy


class Supervised(Method):
    """L = CE(f(weak(x_l)), y_l), averaged over the labeled batch."""

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = []

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled = batch["labeled"]
        return {"loss": cross_entropy(self(labeled.views[0]), labeled.targets)}
