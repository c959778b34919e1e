"""VGG4 of the collision cross-entropy paper (collision_ce spec §5.2).

Four 5×5 conv → BN → ReLU layers (pad 2, no conv bias) with a 2×2/2 max-pool after the first three,
then a linear head on the *flattened* map (no global pooling). Three variants:

| variant | meant for      | widths                 | conv stride | features |
|---------|----------------|------------------------|-------------|----------|
| mnist   | grey 28 px     | 64, 128, 256, 512      | 1           | 512·3·3 = 4608 |
| cifar   | RGB 32 px      | 32, 64, 128, 256       | 1           | 256·4·4 = 4096 |
| stl     | RGB 96 px      | 128, 256, 512, 1024    | 2           | 1024·1·1 = 1024 |

The variant follows `image_size` (≤ 28 → mnist, ≤ 64 → cifar, else stl) unless given; the stem takes
`in_channels` either way, and the feature size is derived from `image_size` (16 px digits with the
mnist variant give 512·2·2 = 2048).
"""

from __future__ import annotations

from torch import Tensor, nn

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["VGG4", "vgg4_variant_for"]

_VARIANTS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mnist": ((64, 128, 256, 512), 1),
    "cifar": ((32, 64, 128, 256), 1),
    "stl": ((128, 256, 512, 1024), 2),
}


def vgg4_variant_for(image_size: int) -> str:
    if image_size <= 28:
        return "mnist"
    return "cifar" if image_size <= 64 else "stl"


class VGG4(Backbone):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        variant = vgg4_variant_for(image_size) if variant is None else variant
        if variant not in _VARIANTS:
            raise ValueError(f"unknown VGG4 variant {variant!r}; choose from {sorted(_VARIANTS)}")
        widths, stride = _VARIANTS[variant]
        self.variant = variant
        self.image_size = image_size

        layers: list[nn.Module] = []
        prev, side = in_channels, image_size
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(prev, width, 5, stride=stride, padding=2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            side = (side + 2 * 2 - 5) // stride + 1
            if i < 3:
                layers.append(nn.MaxPool2d(2, 2))
                side //= 2
            prev = width
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the VGG4 {variant!r} variant")
        self.body = nn.Sequential(*layers)
        self._init_head(widths[-1] * side * side, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        feats = self.body(x).flatten(1)
        if feats.shape[1] != self.num_features:
            # The head is sized for one input resolution; say so instead of a matmul shape error.
            raise ValueError(
                f"VGG4 built for {self.image_size} px got input {tuple(x.shape[-2:])} "
                f"({feats.shape[1]} features instead of {self.num_features})"
            )
        return feats


@register_backbone("vgg4")
def vgg4(num_classes: int, in_channels: int = 3, image_size: int = 32, variant: str | None = None) -> VGG4:
    """VGG4; `variant` in {mnist, cifar, stl}, chosen from `image_size` when None."""
    return VGG4(num_classes, in_channels, image_size, variant)
