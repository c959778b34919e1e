"""Small networks for the CPU demos: the digits CNN and an MLP over fixed features."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["MLP", "SmallCNN"]


class SmallCNN(Backbone):
    """3×3 conv → BN → LeakyReLU(0.1) blocks, 2×2 max-pool after all but the last, global avg pool.

    With the default widths (32, 64, 128) a 16×16 digit is seen at 16, 8 and 4 px: a few MFLOPs per
    image, so the 3-minute CPU demos stay well inside budget.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one block")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.1, inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, 2))
            prev = width
        self.body = nn.Sequential(*layers)
        self._init_head(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


class MLP(Backbone):
    """Linear → [BN] → ReLU → [Dropout] per hidden layer, over inputs flattened to (N, in_features).

    With no hidden layers the features are the inputs and the model is a linear classifier.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        hidden_dims: Sequence[int] = (),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden_dims:
            # A bias right before BN is cancelled by its mean subtraction.
            layers.append(nn.Linear(prev, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        self.in_features = in_features
        self.body = nn.Sequential(*layers)
        self._init_head(prev, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.flatten(1))


@register_backbone("small_cnn")
def small_cnn(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 16,
    widths: Sequence[int] = (32, 64, 128),
) -> SmallCNN:
    """The project's digits CNN (128 features with the default widths)."""
    return SmallCNN(num_classes, in_channels, tuple(widths))


@register_backbone("mlp")
def mlp(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 16,
    in_features: int | None = None,
    hidden_dims: Sequence[int] = (),
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> MLP:
    """MLP over (N, D) features; `in_features` defaults to in_channels·image_size² (flattened images)."""
    dim = in_channels * image_size * image_size if in_features is None else in_features
    return MLP(num_classes, dim, tuple(hidden_dims), batch_norm, dropout)
