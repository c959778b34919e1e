"""ResNet stems: feature-map sizes per stem, the `cifar_stem` alias, and SCAN pretext checkpoints.

SCAN's CIFAR and STL-10 ResNet-18s are rebuilt here in SCAN's own layout (blocks with a `shortcut`
Sequential, SCAN's stems and pools), so that a checkpoint in SCAN's key format loads into our backbone
and gives the same features: the architecture, not just the key names, is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.nets import build_backbone
from ssl_lightning.nets.resnet import TorchvisionResNet


class _ScanBlock(nn.Module):
    """SCAN's BasicBlock: two 3×3 conv-BN pairs and a `shortcut` (1×1 conv + BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class _ScanResNet18(nn.Module):
    """SCAN's `resnet_stl.py` (stl=True: max-pool 2/2 pad 1, AvgPool2d(7)) or `resnet_cifar.py` layout."""

    def __init__(self, stl: bool) -> None:
        super().__init__()
        self.stl = stl
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1) if stl else nn.Identity()
        planes_in, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_ScanBlock(planes_in, planes, stride), _ScanBlock(planes, planes, 1)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        pooled = F.avg_pool2d(out, 7, stride=1) if self.stl else F.adaptive_avg_pool2d(out, 1)
        return pooled.flatten(1)


def _randomise_norm_statistics(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode outputs depend on every BN tensor."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def _map_size_before_pooling(model: TorchvisionResNet, image_size: int) -> tuple[int, ...]:
    captured: list[tuple[int, ...]] = []
    handle = model.encoder.layer4.register_forward_hook(lambda _m, _i, out: captured.append(tuple(out.shape)))
    with torch.no_grad():
        features = model.eval()(torch.randn(1, 3, image_size, image_size))
    handle.remove()
    assert tuple(features.shape) == (1, model.num_features)
    return captured[0]


@pytest.mark.parametrize(
    ("stem", "image_size", "side"), [("stl", 96, 7), ("cifar", 32, 4), ("imagenet", 64, 2), (None, 64, 2)]
)
def test_stem_sets_the_map_size_before_pooling(stem: str | None, image_size: int, side: int) -> None:
    model = build_backbone("resnet18", num_classes=0, image_size=image_size, stem=stem)
    assert _map_size_before_pooling(model, image_size) == (1, 512, side, side)


def test_stem_layers() -> None:
    stl_model = build_backbone("resnet18", num_classes=10, stem="stl")
    assert stl_model.stem == "stl" and not stl_model.cifar_stem
    stl = stl_model.encoder
    assert (stl.conv1.kernel_size, stl.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(stl.maxpool, nn.MaxPool2d)
    assert (stl.maxpool.kernel_size, stl.maxpool.stride, stl.maxpool.padding) == (2, 2, 1)
    imagenet = build_backbone("resnet50", num_classes=10, stem="imagenet").encoder
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))


def test_cifar_stem_flag_is_an_alias() -> None:
    legacy = build_backbone("resnet18", num_classes=10, cifar_stem=True)
    named = build_backbone("resnet18", num_classes=10, stem="cifar")
    assert legacy.stem == named.stem == "cifar" and legacy.cifar_stem and named.cifar_stem
    assert isinstance(legacy.encoder.maxpool, nn.Identity) and legacy.encoder.conv1.stride == (1, 1)
    assert build_backbone("resnet18", num_classes=10, cifar_stem=True, stem="cifar").stem == "cifar"


def test_contradictory_or_unknown_stems_are_refused() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        build_backbone("resnet18", num_classes=10, cifar_stem=True, stem="stl")
    with pytest.raises(ValueError, match="unknown ResNet stem 'tiny'"):
        build_backbone("resnet18", num_classes=10, stem="tiny")


@pytest.mark.parametrize(("stem", "image_size"), [("stl", 96), ("cifar", 32)])
def test_scan_pretext_checkpoint_loads_and_gives_scan_features(
    tmp_path: Path, stem: str, image_size: int
) -> None:
    torch.manual_seed(0)
    scan = _ScanResNet18(stl=stem == "stl")
    _randomise_norm_statistics(scan, seed=1)
    # SCAN's simclr.py saves the whole model: `backbone.*` plus the projection head `contrastive_head.*`.
    state = {f"backbone.{k}": v for k, v in scan.state_dict().items()}
    state |= {
        "contrastive_head.0.weight": torch.randn(512, 512),
        "contrastive_head.0.bias": torch.randn(512),
        "contrastive_head.2.weight": torch.randn(128, 512),
        "contrastive_head.2.bias": torch.randn(128),
    }
    assert any(".shortcut.0." in k for k in state) and any(".shortcut.1." in k for k in state)
    path = tmp_path / "simclr_stl-10.pth.tar"
    torch.save(state, path)

    ours = build_backbone("resnet18", num_classes=10, image_size=image_size, stem=stem)
    report = ours.load_pretrained(str(path))
    assert report.ignored == sorted(k for k in state if k.startswith("contrastive_head."))
    assert report.loaded == len(scan.state_dict())
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = scan.eval()(images)
        features = ours.eval().features(images)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_scan_checkpoint_missing_a_backbone_key_fails(tmp_path: Path) -> None:
    state = {f"backbone.{k}": v for k, v in _ScanResNet18(stl=True).state_dict().items()}
    del state["backbone.layer3.0.shortcut.0.weight"]
    path = tmp_path / "broken.pth.tar"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"missing \(1\): layer3\.0\.downsample\.0\.weight"):
        build_backbone("resnet18", num_classes=10, stem="stl", pretrained_path=str(path))
