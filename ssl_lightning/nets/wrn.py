"""Wide ResNets in the FixMatch / TorchSSL / USB layout.

Pre-activation basic blocks, BatchNorm momentum 0.001 (PyTorch convention, i.e. TF decay 0.999) and
eps 0.001, LeakyReLU(0.1), no dropout by default. Widths are 16 → 16k → 32k → 64k (→ 128k for the
four-stage STL-10 variant).

Depth counts the weighted conv layers: the stem, two 3×3 convs per block and one 1×1 projection per
stage, so depth = 1 + 2·n·S + S for S stages of n blocks. WRN-28 has S = 3, n = 4; WRN-37-2 (USB's
`wrn_var_37_2`, the FixMatch STL-10 net) has S = 4, n = 4, widths 16/32/64/128/256 and a stride-2
first stage, so a 96 px input reaches the pool at 6×6 with 256 features.

Transition blocks (those that change width or stride) feed the *activated* input to both the conv
path and the 1×1 projection, as USB and TorchSSL do; the original TF FixMatch projects the raw input
in stages 2 and 3. Parameter counts are identical, the function differs slightly.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["WideResNet"]

_BN_EPS = 1e-3
_LEAKY_SLOPE = 0.1

# USB / TorchSSL parameter names → ours, so their released checkpoints load key for key.
_USB_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^conv1\.", "stem."),
    (r"^bn1\.", "bn_out."),
    (r"^(block\d+)\.layer\.", r"\1."),
    (r"\.convShortcut\.", ".shortcut."),
)


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, bn_momentum: float, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum, eps=_BN_EPS)
        self.act1 = nn.LeakyReLU(_LEAKY_SLOPE)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum, eps=_BN_EPS)
        self.act2 = nn.LeakyReLU(_LEAKY_SLOPE)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=True)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if in_ch != out_ch or stride != 1:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, padding=0, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.act2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(Backbone):
    """WRN-depth-k with `num_stages` stages; see the module docstring for the layout."""

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        num_stages: int = 3,
        in_channels: int = 3,
        first_stride: int = 1,
        bn_momentum: float = 0.001,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        blocks_total = depth - 1 - num_stages
        if blocks_total <= 0 or blocks_total % (2 * num_stages):
            raise ValueError(f"depth {depth} is not 1 + 2·n·S + S for S={num_stages} stages and integer n")
        n = blocks_total // (2 * num_stages)
        widths = [16] + [16 * widen_factor * 2**i for i in range(num_stages)]

        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=True)
        for s in range(num_stages):
            stride = first_stride if s == 0 else 2
            layers = [
                _BasicBlock(
                    widths[s] if i == 0 else widths[s + 1],
                    widths[s + 1],
                    stride if i == 0 else 1,
                    bn_momentum,
                    drop_rate,
                )
                for i in range(n)
            ]
            self.add_module(f"block{s + 1}", nn.Sequential(*layers))
        self.num_stages = num_stages
        self.bn_out = nn.BatchNorm2d(widths[-1], momentum=bn_momentum, eps=_BN_EPS)
        self.act_out = nn.LeakyReLU(_LEAKY_SLOPE)
        self._init_head(widths[-1], num_classes)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The FixMatch/USB initialisation; conv biases keep PyTorch's default, as there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        for s in range(self.num_stages):
            out = getattr(self, f"block{s + 1}")(out)
        out = self.act_out(self.bn_out(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if not any(k.startswith("stem.") for k in state):
            renamed: dict[str, Tensor] = {}
            for key, value in state.items():
                for pattern, repl in _USB_RENAMES:
                    key = re.sub(pattern, repl, key)
                renamed[key] = value
            state = renamed
        return state


@register_backbone("wrn28_2")
def wrn28_2(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    first_stride: int = 1,
    bn_momentum: float = 0.001,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-28-2 (CIFAR-10, SVHN; `first_stride=2` for the 96 px STL-10 variant)."""
    return WideResNet(num_classes, 28, 2, 3, in_channels, first_stride, bn_momentum, drop_rate)


@register_backbone("wrn28_8")
def wrn28_8(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    first_stride: int = 1,
    bn_momentum: float = 0.001,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-28-8 (CIFAR-100)."""
    return WideResNet(num_classes, 28, 8, 3, in_channels, first_stride, bn_momentum, drop_rate)


@register_backbone("wrn37_2")
def wrn37_2(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 96,
    first_stride: int = 2,
    bn_momentum: float = 0.001,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-37-2: USB's four-stage STL-10 net (widths 16/32/64/128/256, stride-2 first stage)."""
    return WideResNet(num_classes, 37, 2, 4, in_channels, first_stride, bn_momentum, drop_rate)
