"""torchvision ResNets (random init; weights only from a local file) behind the Backbone interface."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision import models as tvm

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["TorchvisionResNet"]


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
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision ResNets take 1- or 3-channel inputs, got {in_channels}")
        net = factory(weights=None)
        if cifar_stem:
            # A 7×7/2 conv plus max-pool would shrink 32 px inputs to 8×8 before the first stage.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.encoder = net
        self.cifar_stem = cifar_stem
        self._init_head(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(self._match_channels(x))

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # SCAN's CIFAR/STL ResNets name the projection branch `shortcut`; torchvision calls it
        # `downsample` with the same (conv, bn) layout.
        return {k.replace(".shortcut.", ".downsample."): v for k, v in state.items()}


@register_backbone("resnet18")
def resnet18(
    num_classes: int, in_channels: int = 3, image_size: int = 224, cifar_stem: bool = False
) -> TorchvisionResNet:
    """torchvision ResNet-18 (512 features); `cifar_stem=True` for 32 px inputs."""
    return TorchvisionResNet(tvm.resnet18, num_classes, in_channels, cifar_stem)


@register_backbone("resnet50")
def resnet50(
    num_classes: int, in_channels: int = 3, image_size: int = 224, cifar_stem: bool = False
) -> TorchvisionResNet:
    """torchvision ResNet-50 (2048 features, BN momentum 0.1); `cifar_stem=True` for 32 px."""
    return TorchvisionResNet(tvm.resnet50, num_classes, in_channels, cifar_stem)
