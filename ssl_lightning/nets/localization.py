"""Backbones for weakly supervised localisation: GAP classifiers that also return their last conv map.

Spec: specs/infocam.md §5.1. Every class here is a `Backbone` with

    forward_with_map(x) -> (logits, F)     F: (B, C, h, w), post-ReLU (post-ADL in train mode)
    features(x) = GAP(F),  forward(x) = head(GAP(F)),  classifier_weight: (K, C) = head.weight

so class-activation maps need no hooks. Registered names and feature maps:

| name          | trunk                                                     | F at 224 px  | at 64 px   |
|---------------|-----------------------------------------------------------|--------------|------------|
| `vgg16_gap`   | VGG16 conv1_1…conv5_3 (no pool5) + conv6 3×3 512→1024     | 1024×14×14   | 1024×4×4   |
| `resnet50_s1` | torchvision ResNet-50, layer4 stride 1 (no dilation)      | 2048×14×14   | 2048×4×4   |
| `digits_cnn`  | [conv3×3 → BN → ReLU]×2 at widths 16/32/64, pool after 2  | —            | 64×16×16   |

ADL (attention-based dropout, Choe & Shim 2019) can be inserted at named positions; it has no parameters,
so pretrained files map key for key with or without it. ImageNet weights come from a local
torchvision-format file (`pretrained_path` of `build_backbone`), never from the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

log = logging.getLogger(__name__)

__all__ = [
    "ADL",
    "DigitsCNN",
    "LocalizationBackbone",
    "ResNet50S1",
    "VGG16GAP",
    "digits_cnn",
    "resnet50_s1",
    "vgg16_gap",
]


class ADL(nn.Module):
    """Attention-based dropout layer; the identity in eval mode.

    In train mode, with a = mean_c F (B×1×H×W):
        importance = sigmoid(a),   drop = 1[a < drop_threshold · max_{HW} a]  (per image),
        output = F ⊙ (z · drop + (1 − z) · importance),   z ~ Bernoulli(drop_rate),
    with ONE z per forward call, shared by the whole batch (drawn on the input's device, from the
    generator `seed_everything` seeds). ADL adds no loss.
    """

    def __init__(self, drop_rate: float = 0.75, drop_threshold: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"ADL drop_rate must be in [0, 1], got {drop_rate}")
        if not 0.0 < drop_threshold <= 1.0:
            raise ValueError(f"ADL drop_threshold must be in (0, 1], got {drop_threshold}")
        self.drop_rate = float(drop_rate)
        self.drop_threshold = float(drop_threshold)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        importance = torch.sigmoid(attention)
        peak = attention.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
        drop = (attention < self.drop_threshold * peak).to(x.dtype)
        z = (torch.rand((), device=x.device) < self.drop_rate).to(x.dtype)
        return x * (z * drop + (1 - z) * importance)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, drop_threshold={self.drop_threshold}"


def _adl_modules(
    positions: Sequence[str], valid: Sequence[str], drop_rate: float, drop_threshold: float, net: str
) -> nn.ModuleDict:
    unknown = sorted(set(positions) - set(valid))
    if unknown:
        raise ValueError(f"unknown ADL positions {unknown} for {net}; valid positions: {list(valid)}")
    return nn.ModuleDict({p: ADL(drop_rate, drop_threshold) for p in dict.fromkeys(positions)})


class LocalizationBackbone(Backbone):
    """A GAP classifier whose last conv map is available: subclasses implement `feature_map`."""

    adl: nn.ModuleDict

    def feature_map(self, x: Tensor) -> Tensor:
        """Last conv map F (B, C, h, w), post-ReLU, post-ADL in train mode."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, F) from a single pass; logits = head(GAP(F)) (the pooled features if no head)."""
        fmap = self.feature_map(x)
        return self.head(fmap.mean(dim=(2, 3))), fmap

    @property
    def classifier_weight(self) -> Tensor:
        """(K, C) weight W of the linear classifier on GAP(F), for class-activation maps."""
        if not isinstance(self.head, nn.Linear):
            # Not AttributeError: nn.Module.__getattr__ would replace the message with "no attribute".
            raise RuntimeError(f"{type(self).__name__} was built without a head (num_classes=0)")
        return self.head.weight

    @property
    def classifier_bias(self) -> Tensor:
        """(K,) bias b of the linear classifier."""
        if not isinstance(self.head, nn.Linear) or self.head.bias is None:
            raise RuntimeError(f"{type(self).__name__} has no classifier bias")
        return self.head.bias

    @property
    def adl_positions(self) -> list[str]:
        return list(self.adl.keys())


# ------------------------------------------------------------------------------------------ VGG16-GAP

# torchvision's VGG16 ("D") conv widths per stage; its `features` indices are reproduced exactly.
_VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512,) * 3, (512,) * 3)


def _vgg16_position_index() -> dict[str, int]:
    """ADL position → index in the trunk: "{s}{c}" after conv s_c's ReLU, "{s}M" after pool s."""
    index: dict[str, int] = {}
    i = -1
    for s, widths in enumerate(_VGG16_STAGES, start=1):
        for c in range(1, len(widths) + 1):
            i += 2  # conv, ReLU
            index[f"{s}{c}"] = i
        if s < len(_VGG16_STAGES):
            i += 1
            index[f"{s}M"] = i
    return index


class VGG16GAP(LocalizationBackbone):
    """VGG16 conv1_1…conv5_3 (with ReLU), pool5 removed, conv6 3×3 512→1024 + ReLU, GAP, fc.

    `trunk` holds torchvision's `features[:30]` with the same indices, so an ImageNet file's
    `features.N.*` keys load onto `trunk.N.*`; its `classifier.*` keys are ignored, and conv6 (absent from
    ImageNet files) keeps its Kaiming-normal (fan_out) init. The fc head is N(0, 0.01²) with zero bias.
    ADL positions: "{s}M" after pool s (s = 1…4) and "{s}{c}" after conv s_c + ReLU, e.g. the spec's
    "3M", "4M", "53".
    """

    _fixed_in_channels = 3

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        adl_positions: Sequence[str] = (),
        adl_drop_rate: float = 0.75,
        adl_drop_threshold: float = 0.8,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"vgg16_gap takes 1- or 3-channel inputs, got {in_channels}")
        # Position name → index of the trunk layer after which ADL is applied; checked before any
        # layer is built, so a typo fails fast.
        position_index = _vgg16_position_index()
        self.adl = _adl_modules(
            adl_positions, list(position_index), adl_drop_rate, adl_drop_threshold, "vgg16_gap"
        )
        self._adl_after = {position_index[p]: p for p in self.adl}
        layers: list[nn.Module] = []
        prev = 3
        for s, widths in enumerate(_VGG16_STAGES, start=1):
            for width in widths:
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU(inplace=True)]
                prev = width
            if s < len(_VGG16_STAGES):  # pool5 is removed to keep a 14×14 map at 224 px
                layers.append(nn.MaxPool2d(2, 2))
        self.trunk = nn.Sequential(*layers)
        self.conv6 = nn.Conv2d(512, 1024, 3, padding=1)
        self.relu6 = nn.ReLU(inplace=True)
        self._init_head(1024, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # torchvision's VGG init for the trunk, and the spec's for conv6.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, 0.0, 0.01)
            nn.init.zeros_(self.head.bias)

    def feature_map(self, x: Tensor) -> Tensor:
        x = self._match_channels(x)
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in self._adl_after:
                x = self.adl[self._adl_after[i]](x)
        return self.relu6(self.conv6(x))

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {
            ("trunk." + k[len("features.") :] if k.startswith("features.") else k): v
            for k, v in state.items()
        }
        if not any(k.startswith("conv6.") for k in out):
            # An ImageNet VGG16 file has no conv6: it is a new layer and keeps its fresh init.
            log.info("vgg16_gap: the pretrained file has no conv6; conv6 keeps its random init")
            out.update({f"conv6.{k}": v for k, v in self.conv6.state_dict().items()})
        return out


# --------------------------------------------------------------------------------------- ResNet-50 s1


_RESNET50_BLOCKS: tuple[int, ...] = (3, 4, 6, 3)


class ResNet50S1(LocalizationBackbone):
    """torchvision ResNet-50 with layer4's stride set to 1 (its first block's 3×3 conv and 1×1 downsample).

    No dilation; the surgery changes no parameter shape, so torchvision-format files load unchanged onto
    `encoder` (their `fc.*` is ignored). The head fc(2048 → K) has torchvision's default Linear init.
    ADL positions: "{l}{b}" after block b of layer l, e.g. the spec's "30", "40", "42".
    """

    _trunk_attr = "encoder"
    _fixed_in_channels = 3

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        adl_positions: Sequence[str] = (),
        adl_drop_rate: float = 0.75,
        adl_drop_threshold: float = 0.9,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"resnet50_s1 takes 1- or 3-channel inputs, got {in_channels}")
        valid = [f"{li}{bi}" for li, blocks in enumerate(_RESNET50_BLOCKS, start=1) for bi in range(blocks)]
        self.adl = _adl_modules(adl_positions, valid, adl_drop_rate, adl_drop_threshold, "resnet50_s1")
        net = tvm.resnet50(weights=None)
        first = net.layer4[0]
        first.conv2.stride = (1, 1)
        assert first.downsample is not None
        first.downsample[0].stride = (1, 1)
        net.fc = nn.Identity()
        self.encoder = net
        self._init_head(2048, num_classes)

    def feature_map(self, x: Tensor) -> Tensor:
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(self._match_channels(x)))))
        for li, layer in enumerate((e.layer1, e.layer2, e.layer3, e.layer4), start=1):
            for bi, block in enumerate(layer):
                x = block(x)
                key = f"{li}{bi}"
                if key in self.adl:
                    x = self.adl[key](x)
        return x


# ------------------------------------------------------------------------------------------ digits CNN


class DigitsCNN(LocalizationBackbone):
    """[conv3×3 (no bias) → BN → ReLU]×2 per stage at `widths`, 2×2 max-pool after all but the last stage.

    With the default widths (16, 32, 64) a 64 px canvas gives F = 64×16×16. ADL positions: "1", "2", … after
    each stage (after its pool, if any).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        adl_positions: Sequence[str] = (),
        adl_drop_rate: float = 0.75,
        adl_drop_threshold: float = 0.8,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        stages: list[nn.Module] = []
        prev = in_channels
        for s, width in enumerate(widths):
            layers: list[nn.Module] = []
            for _ in range(2):
                layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                prev = width
            if s < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, 2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        valid = [str(s) for s in range(1, len(widths) + 1)]
        self.adl = _adl_modules(adl_positions, valid, adl_drop_rate, adl_drop_threshold, "digits_cnn")
        self._init_head(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: Tensor) -> Tensor:
        for s, stage in enumerate(self.stages, start=1):
            x = stage(x)
            key = str(s)
            if key in self.adl:
                x = self.adl[key](x)
        return x


# ----------------------------------------------------------------------------------------- registry


@register_backbone("vgg16_gap")
def vgg16_gap(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    adl_positions: Sequence[str] = (),
    adl_drop_rate: float = 0.75,
    adl_drop_threshold: float = 0.8,
) -> VGG16GAP:
    """VGG16-GAP (F = 1024 × S/16 × S/16); spec ADL setting: positions ["3M", "4M", "53"], threshold 0.8."""
    return VGG16GAP(num_classes, in_channels, list(adl_positions), adl_drop_rate, adl_drop_threshold)


@register_backbone("resnet50_s1")
def resnet50_s1(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    adl_positions: Sequence[str] = (),
    adl_drop_rate: float = 0.75,
    adl_drop_threshold: float = 0.9,
) -> ResNet50S1:
    """ResNet-50, layer4 stride 1 (F = 2048 × S/16 × S/16); spec ADL: ["30", "40", "42"], threshold 0.9."""
    return ResNet50S1(num_classes, in_channels, list(adl_positions), adl_drop_rate, adl_drop_threshold)


@register_backbone("digits_cnn")
def digits_cnn(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 64,
    widths: Sequence[int] = (16, 32, 64),
    adl_positions: Sequence[str] = (),
    adl_drop_rate: float = 0.75,
    adl_drop_threshold: float = 0.8,
) -> DigitsCNN:
    """The digits-loc CNN (F = 64 × S/4 × S/4 with the default widths); ADL is off in the spec."""
    return DigitsCNN(
        num_classes, in_channels, tuple(widths), list(adl_positions), adl_drop_rate, adl_drop_threshold
    )
