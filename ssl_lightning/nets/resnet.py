"""torchvision ResNets (random init; weights only from a local file) behind the Backbone interface.

Three stems: ``imagenet`` (torchvision's 7×7/2 conv and 3×3/2 max-pool), ``cifar`` (3×3/1 conv, no
max-pool: SCAN's ``resnet_cifar.py``) and ``stl`` (3×3/1 conv, then MaxPool(2, stride 2, padding 1):
SCAN's ``resnet_stl.py``, which leaves 7×7 maps at 96 px before the global average pool). SCAN ends in
``AvgPool2d(7)``; torchvision's adaptive average pool is the same global mean on those maps, so SCAN
pretext checkpoints load and compute the same features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from torch import Tensor, nn
from torchvision import models as tvm

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["ResNetStem", "TorchvisionResNet", "resolve_stem"]

ResNetStem = Literal["imagenet", "cifar", "stl"]


def resolve_stem(stem: ResNetStem | None, cifar_stem: bool) -> ResNetStem:
    """The stem to build: ``stem`` when given, else ``cifar`` for the legacy ``cifar_stem=True`` flag."""
    if stem is None:
        return "cifar" if cifar_stem else "imagenet"
    if stem not in get_args(ResNetStem):
        raise ValueError(f"unknown ResNet stem {stem!r}; choose one of {', '.join(get_args(ResNetStem))}")
    if cifar_stem and stem != "cifar":
        raise ValueError(f"cifar_stem=True contradicts stem={stem!r}; set only one of them")
    return stem


class TorchvisionResNet(Backbone):
    """A torchvision ResNet whose `fc` is replaced by our head.

    The stem stays at 3 channels so ImageNet-layout files load unchanged; grey inputs are repeated.
    The wrapped model lives in `encoder`, with torchvision's parameter names.
    """

    _trunk_attr = "encoder"
    _fixed_in_channels = 3

    def __init__(
        self,
        factory: Callable[..., tvm.ResNet],
        num_classes: int,
        in_channels: int = 3,
        cifar_stem: bool = False,
        stem: ResNetStem | None = None,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision ResNets take 1- or 3-channel inputs, got {in_channels}")
        self.stem = resolve_stem(stem, cifar_stem)
        net = factory(weights=None)
        if self.stem != "imagenet":
            # A 7×7/2 conv plus max-pool would shrink 32 px inputs to 8×8 before the first stage.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            # SCAN's STL-10 network keeps a (cheaper) max-pool: 96 px → 49 px before the first stage.
            net.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1) if self.stem == "stl" else nn.Identity()
        num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.encoder = net
        self.cifar_stem = self.stem == "cifar"
        self._init_head(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(self._match_channels(x))

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # SCAN's CIFAR/STL ResNets name the projection branch `shortcut`; torchvision calls it
        # `downsample` with the same (conv, bn) layout.
        return {k.replace(".shortcut.", ".downsample."): v for k, v in state.items()}


@register_backbone("resnet18")
def resnet18(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    cifar_stem: bool = False,
    stem: ResNetStem | None = None,
) -> TorchvisionResNet:
    """torchvision ResNet-18 (512 features); `stem="cifar"` (alias `cifar_stem=True`) for 32 px inputs,
    `stem="stl"` for SCAN's 96 px STL-10 network."""
    return TorchvisionResNet(tvm.resnet18, num_classes, in_channels, cifar_stem, stem)


@register_backbone("resnet50")
def resnet50(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    cifar_stem: bool = False,
    stem: ResNetStem | None = None,
) -> TorchvisionResNet:
    """torchvision ResNet-50 (2048 features, BN momentum 0.1); `stem` as for `resnet18`."""
    return TorchvisionResNet(tvm.resnet50, num_classes, in_channels, cifar_stem, stem)
