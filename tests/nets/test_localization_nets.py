"""WSOL backbones and ADL: specs/infocam.md §8 tests 22 (shapes, ADL) and 23 (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision.models._api
from torch import nn
from torchvision import models as tvm

from ssl_lightning.nets import build_backbone
from ssl_lightning.nets.localization import ADL, LocalizationBackbone

SPEC_ADL: dict[str, list[str]] = {
    "vgg16_gap": ["3M", "4M", "53"],
    "resnet50_s1": ["30", "40", "42"],
    "digits_cnn": [],
}


def _build(name: str, **kwargs: Any) -> LocalizationBackbone:
    channels = 1 if name == "digits_cnn" else 3
    model = build_backbone(name, num_classes=7, in_channels=channels, image_size=64, **kwargs)
    assert isinstance(model, LocalizationBackbone)
    return model


def _refuse_download(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a download was attempted")


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse_download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _refuse_download)


@pytest.fixture(scope="module")
def models() -> dict[str, LocalizationBackbone]:
    """Every backbone with the spec's ADL positions, built once per module, with downloads forbidden."""
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _forbid_downloads(monkeypatch)
        return {name: _build(name, adl_positions=positions) for name, positions in SPEC_ADL.items()}


# --------------------------------------------------------------------------------- test 22: shapes


@pytest.mark.parametrize(
    ("name", "side", "expected"),
    [
        ("vgg16_gap", 64, (1024, 4, 4)),
        ("resnet50_s1", 64, (2048, 4, 4)),
        ("digits_cnn", 64, (64, 16, 16)),
    ],
)
def test_feature_maps_at_64_px(
    models: dict[str, LocalizationBackbone], name: str, side: int, expected: tuple[int, int, int]
) -> None:
    model = models[name].eval()
    x = torch.randn(2, 1 if name == "digits_cnn" else 3, side, side)
    with torch.no_grad():
        logits, fmap = model.forward_with_map(x)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.features(x), fmap.mean(dim=(2, 3)))
    assert fmap.shape == (2, *expected) and logits.shape == (2, 7)
    assert (fmap >= 0).all()  # post-ReLU
    assert model.classifier_weight.shape == (7, expected[0])
    assert model.num_features == expected[0]


@pytest.mark.parametrize(("name", "channels"), [("vgg16_gap", 1024), ("resnet50_s1", 2048)])
def test_feature_maps_at_224_px(name: str, channels: int) -> None:
    # Shapes only, on the meta device: a real 224 px pass takes seconds on one CPU thread.
    with torch.device("meta"):
        model = _build(name, adl_positions=SPEC_ADL[name])
    for mode in (model.eval, model.train):
        mode()
        logits, fmap = model.forward_with_map(torch.empty(2, 3, 224, 224, device="meta"))
        assert fmap.shape == (2, channels, 14, 14) and logits.shape == (2, 7)


def test_resnet_stride_surgery(models: dict[str, LocalizationBackbone]) -> None:
    model = models["resnet50_s1"]
    first = model.encoder.layer4[0]
    assert first.conv2.stride == (1, 1) and first.downsample[0].stride == (1, 1)
    assert first.conv2.dilation == (1, 1)
    assert model.encoder.layer3[0].conv2.stride == (2, 2)  # the rest is untouched


def test_grey_input_is_repeated_for_rgb_stems(models: dict[str, LocalizationBackbone]) -> None:
    model = models["resnet50_s1"].eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.repeat(1, 3, 1, 1)))


def test_vgg_init_and_digits_layout(models: dict[str, LocalizationBackbone]) -> None:
    vgg = models["vgg16_gap"]
    assert vgg.head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(vgg.head.bias, torch.zeros(7)) and torch.equal(vgg.conv6.bias, torch.zeros(1024))
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.trunk) == 4  # pool5 removed

    digits = models["digits_cnn"]
    convs = [m for m in digits.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert all(c.bias is None for c in convs) and convs[0].in_channels == 1
    assert sum(isinstance(m, nn.MaxPool2d) for m in digits.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in digits.modules()) == 6


def test_unknown_adl_position_is_rejected(models: dict[str, LocalizationBackbone]) -> None:
    with pytest.raises(ValueError, match=r"unknown ADL positions \['5M'\]"):
        _build("vgg16_gap", adl_positions=["3M", "5M"])  # pool5 does not exist
    with pytest.raises(ValueError, match="unknown ADL positions"):
        _build("resnet50_s1", adl_positions=["43"])
    with pytest.raises(ValueError, match="unknown ADL positions"):
        _build("digits_cnn", adl_positions=["4"])
    assert models["resnet50_s1"].adl_positions == ["30", "40", "42"]
    assert models["vgg16_gap"].adl_positions == ["3M", "4M", "53"]
    # "3M", "4M", "53" sit right after pool3, pool4 and conv5_3's ReLU.
    trunk = models["vgg16_gap"].trunk
    after = models["vgg16_gap"]._adl_after
    assert [type(trunk[i]) for i in sorted(after)] == [nn.MaxPool2d, nn.MaxPool2d, nn.ReLU]
    assert sorted(after) == [16, 23, 29]


def test_no_head_returns_pooled_features() -> None:
    model = build_backbone("digits_cnn", num_classes=0, in_channels=1, image_size=32).eval()
    with torch.no_grad():
        out, fmap = model.forward_with_map(torch.randn(2, 1, 32, 32))
    torch.testing.assert_close(out, fmap.mean(dim=(2, 3)))
    with pytest.raises(RuntimeError, match="without a head"):
        _ = model.classifier_weight


# ------------------------------------------------------------------------------------ test 22: ADL


def _activations(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(4, 6, 5, 5, generator=gen))


def test_adl_is_the_identity_in_eval_mode() -> None:
    x = _activations()
    adl = ADL(drop_rate=1.0, drop_threshold=0.5).eval()
    assert adl(x) is x
    model = _build("digits_cnn", adl_positions=["1", "2", "3"]).eval()
    plain = _build("digits_cnn").eval()
    plain.load_state_dict(model.state_dict())  # ADL has no state: the same keys
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_adl_drop_branch_zeroes_exactly_the_peak_positions() -> None:
    x = _activations()
    out = ADL(drop_rate=1.0, drop_threshold=0.8).train()(x)  # z = 1 always
    a = x.mean(dim=1, keepdim=True)
    peak = a.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    dropped = (a >= 0.8 * peak).expand_as(x)
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    assert torch.equal(out[~dropped], x[~dropped])
    assert dropped[:, 0].any(dim=(1, 2)).all()  # every image loses its peak


def test_adl_importance_branch_and_one_draw_per_call() -> None:
    x = _activations(1)
    importance = ADL(drop_rate=0.0, drop_threshold=0.8).train()(x)  # z = 0 always
    torch.testing.assert_close(importance, x * torch.sigmoid(x.mean(dim=1, keepdim=True)))

    adl = ADL(drop_rate=0.75, drop_threshold=0.8).train()
    drop = ADL(drop_rate=1.0, drop_threshold=0.8).train()(x)
    torch.manual_seed(0)
    draws = []
    for _ in range(400):
        out = adl(x)
        is_drop = [torch.equal(out[i], drop[i]) for i in range(x.shape[0])]
        is_importance = [torch.equal(out[i], importance[i]) for i in range(x.shape[0])]
        # The whole batch takes the same branch.
        assert all(is_drop) or all(is_importance)
        draws.append(all(is_drop))
    rate = sum(draws) / len(draws)
    assert abs(rate - 0.75) < 0.08  # 400 Bernoulli(0.75) draws: SE ≈ 0.022


def test_adl_argument_validation() -> None:
    with pytest.raises(ValueError, match="drop_rate"):
        ADL(drop_rate=1.5)
    with pytest.raises(ValueError, match="drop_threshold"):
        ADL(drop_threshold=0.0)


# ------------------------------------------------------------------------------ test 23: no network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)


def test_every_backbone_builds_without_weights(models: dict[str, LocalizationBackbone]) -> None:
    # The module fixture built them with every download entry point replaced by a failure.
    assert sorted(models) == sorted(SPEC_ADL)
    assert all(model.num_classes == 7 for model in models.values())
    with pytest.raises(AssertionError, match="download was attempted"), pytest.MonkeyPatch.context() as mp:
        _forbid_downloads(mp)
        tvm.resnet18(weights=tvm.ResNet18_Weights.IMAGENET1K_V1)  # the guard itself works


@pytest.mark.usefixtures("no_network")
def test_resnet50_s1_loads_a_torchvision_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tvm.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)  # torchvision format, 1000-way fc included
    torch.manual_seed(1)
    model = build_backbone(
        "resnet50_s1",
        num_classes=7,
        image_size=64,
        pretrained_path=str(path),
        adl_positions=SPEC_ADL["resnet50_s1"],
    ).eval()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.head.out_features == 7
    # Same weights with the same stride surgery: the same map.
    source.layer4[0].conv2.stride = (1, 1)
    source.layer4[0].downsample[0].stride = (1, 1)
    trunk = nn.Sequential(*list(source.children())[:-2])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_with_map(x)[1], trunk(x), rtol=0, atol=0)


@pytest.mark.usefixtures("no_network")
def test_vgg16_gap_loads_a_torchvision_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # torchvision's own VGG16 feature builder; the full model's 120M-parameter classifier would take
    # seconds to initialise, and one small classifier key is enough to show it is ignored.
    features = tvm.vgg.make_layers(tvm.vgg.cfgs["D"]).eval()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 4096)
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_backbone("vgg16_gap", num_classes=7, image_size=64, pretrained_path=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # Index for index the same layers as torchvision's features, minus pool5.
        torch.testing.assert_close(model.trunk(x), features[:30](x), rtol=0, atol=0)
    assert len(model.trunk) == 30 and isinstance(features[30], nn.MaxPool2d)

    # conv6 is new: loading an ImageNet file leaves it as initialised. A file saved from vgg16_gap
    # itself restores conv6 too.
    other = _build("vgg16_gap")
    conv6 = other.conv6.weight.detach().clone()
    report = other.load_pretrained(str(path))
    assert report.ignored == ["classifier.6.bias", "classifier.6.weight"]
    assert torch.equal(other.conv6.weight, conv6)
    assert torch.equal(other.trunk[28].weight, features[28].weight)
    own = tmp_path / "own.pth"
    torch.save(model.state_dict(), own)
    other.load_pretrained(str(own))
    assert torch.equal(other.conv6.weight, model.conv6.weight)


@pytest.mark.usefixtures("no_network")
def test_digits_cnn_round_trip_and_missing_file(
    models: dict[str, LocalizationBackbone], tmp_path: Path
) -> None:
    source = models["digits_cnn"].eval()
    path = tmp_path / "digits.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("digits_cnn", num_classes=4, in_channels=1, pretrained_path=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source.features(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone(
            "digits_cnn", num_classes=4, in_channels=1, pretrained_path=str(tmp_path / "absent.pth")
        )
