"""Backbone registry, shapes, parameter counts and local pretrained-weight loading."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from ssl_lightning.nets import Backbone, ProjectionHead, available_backbones, build_backbone
from ssl_lightning.nets.pretrained import sha256_of_file

# Small but real configurations: every name is built and run on a 2-image batch.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "wrn28_2": {"image_size": 8},
    "wrn28_8": {"image_size": 8},
    "wrn37_2": {"image_size": 16},
    "resnet18": {"image_size": 16, "cifar_stem": True},
    "resnet50": {"image_size": 32},
    "vit_tiny": {"image_size": 16, "depth": 2},
    "vit_small": {"image_size": 32, "patch_size": 8, "depth": 2},
    "vit_base": {"image_size": 32, "patch_size": 16, "depth": 1},
    "vgg4": {"image_size": 28},
    "small_cnn": {"image_size": 16},
    "mlp": {"image_size": 8, "hidden_dims": (32, 16)},
    "vgg16_gap": {"image_size": 32},
    "resnet50_s1": {"image_size": 32},
    "digits_cnn": {"image_size": 16},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def split_kwargs(name: str) -> tuple[int, dict[str, Any]]:
    kwargs = dict(SMALL_CONFIGS[name])
    return kwargs.pop("image_size"), kwargs


def test_registry_names() -> None:
    assert set(available_backbones()) == set(SMALL_CONFIGS)
    assert available_backbones() == sorted(available_backbones())


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'wrn99'") as err:
        build_backbone("wrn99", num_classes=10)
    for name in available_backbones():
        assert name in str(err.value)


def test_unknown_kwarg_names_the_key() -> None:
    with pytest.raises(TypeError, match="not_an_option"):
        build_backbone("small_cnn", num_classes=10, not_an_option=3)


# The two large nets run once (RGB); their grey path is the same code as wrn28_2's / resnet18's.
SHAPE_CASES = [
    (name, ch)
    for name in sorted(SMALL_CONFIGS)
    for ch in (1, 3)
    if ch == 3 or name not in ("wrn28_8", "resnet50", "vgg16_gap", "resnet50_s1")
]


@pytest.mark.parametrize(("name", "in_channels"), SHAPE_CASES)
def test_shapes_and_forward_with_features(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    image_size, kwargs = split_kwargs(name)
    model = build_backbone(name, num_classes=5, in_channels=in_channels, image_size=image_size, **kwargs)
    assert isinstance(model, Backbone)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.num_features and model.head.out_features == 5
    model.eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model.forward_with_features(x)
    assert logits.shape == (2, 5)
    assert feats.shape == (2, model.num_features)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(model.head(feats), logits)


def test_train_mode_backward() -> None:
    model = build_backbone("small_cnn", num_classes=10, in_channels=1, image_size=16)
    logits, feats = model.forward_with_features(torch.randn(4, 1, 16, 16))
    (logits.sum() + feats.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["small_cnn", "wrn28_2", "resnet18", "vit_tiny", "vgg4", "mlp"])
def test_num_classes_zero_means_no_head(name: str) -> None:
    image_size, kwargs = split_kwargs(name)
    model = build_backbone(name, num_classes=0, in_channels=1, image_size=image_size, **kwargs).eval()
    assert isinstance(model.head, nn.Identity)
    x = torch.randn(2, 1, image_size, image_size)
    with torch.no_grad():
        out = model(x)
        logits, feats = model.forward_with_features(x)
    assert out.shape == (2, model.num_features)
    torch.testing.assert_close(out, feats)
    torch.testing.assert_close(logits, feats)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_grey_input_is_repeated_for_fixed_rgb_stems(name: str) -> None:
    image_size, kwargs = split_kwargs(name)
    model = build_backbone(name, num_classes=3, in_channels=1, image_size=image_size, **kwargs).eval()
    x = torch.randn(2, 1, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.repeat(1, 3, 1, 1)))


# ---------------------------------------------------------------- parameter counts and layouts


def test_wrn_parameter_counts() -> None:
    wrn28_2 = build_backbone("wrn28_2", num_classes=10)
    assert n_params(wrn28_2) == 1_469_642
    assert round(n_params(wrn28_2) / 1e6, 2) == 1.47
    assert n_params(build_backbone("wrn28_2", num_classes=100)) == 1_481_252
    wrn28_8 = build_backbone("wrn28_8", num_classes=100)
    assert n_params(wrn28_8) == 23_409_092
    assert round(n_params(wrn28_8) / 1e6, 1) == 23.4
    assert n_params(build_backbone("wrn37_2", num_classes=10, image_size=96)) == 5_933_770
    assert wrn28_2.num_features == 128 and wrn28_8.num_features == 512


def test_wrn_layout() -> None:
    model = build_backbone("wrn28_2", num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.001 and m.eps == 1e-3 for m in bns)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(m.negative_slope == 0.1 for m in acts)
    assert not any(isinstance(m, (nn.Dropout, nn.ReLU)) for m in model.modules())
    assert model.stem.in_channels == 3
    assert build_backbone("wrn28_2", num_classes=10, in_channels=1).stem.in_channels == 1

    # STL-10 variant of WRN-28-2: 96 → 48 in the first stage, 12×12 before the pool.
    stl = build_backbone("wrn28_2", num_classes=10, image_size=96, first_stride=2)
    assert n_params(stl) == n_params(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        h = stl.block1(stl.stem(x))
        assert h.shape[-1] == 48
        assert stl.block3(stl.block2(h)).shape[-1] == 12

    # WRN-37-2: four stages of four blocks, widths 32 … 256, stride-2 first stage.
    wrn37 = build_backbone("wrn37_2", num_classes=10, image_size=96)
    assert wrn37.num_stages == 4 and wrn37.num_features == 256
    widths = [wrn37.get_submodule(f"block{s}")[-1].conv2.out_channels for s in range(1, 5)]
    assert widths == [32, 64, 128, 256]
    assert all(len(wrn37.get_submodule(f"block{s}")) == 4 for s in range(1, 5))
    assert wrn37.block1[0].conv1.stride == (2, 2)


@pytest.mark.parametrize(
    ("image_size", "in_channels", "features", "params"),
    [(28, 1, 4608, 4_350_410), (32, 3, 4096, 1_119_530), (96, 3, 1024, 17_226_890)],
)
def test_vgg4_variants(image_size: int, in_channels: int, features: int, params: int) -> None:
    model = build_backbone("vgg4", num_classes=10, in_channels=in_channels, image_size=image_size)
    assert model.num_features == features
    assert n_params(model) == params


def test_vgg4_rejects_other_resolutions() -> None:
    model = build_backbone("vgg4", num_classes=10, image_size=32).eval()
    with pytest.raises(ValueError, match="built for 32 px"):
        model(torch.randn(1, 3, 28, 28))


def test_small_cnn_and_mlp_layout() -> None:
    cnn = build_backbone("small_cnn", num_classes=10, in_channels=1, image_size=16)
    assert cnn.num_features == 128
    convs = [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 64, 128]
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn.modules()) == 2

    feat_mlp = build_backbone("mlp", num_classes=4, in_features=20, hidden_dims=(8,)).eval()
    assert feat_mlp.num_features == 8
    assert feat_mlp(torch.randn(3, 20)).shape == (3, 4)
    linear = build_backbone("mlp", num_classes=4, in_features=20)
    assert linear.num_features == 20 and n_params(linear) == 20 * 4 + 4


# ---------------------------------------------------------------- pretrained weights


def _save(obj: Any, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize(
    ("name", "image_size", "kwargs"),
    [
        ("resnet18", 16, {"cifar_stem": True}),
        ("wrn28_2", 8, {}),
        ("vit_tiny", 16, {"depth": 2}),
        ("small_cnn", 16, {}),
    ],
)
def test_pretrained_round_trip(name: str, image_size: int, kwargs: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone(name, num_classes=10, image_size=image_size, **kwargs).eval()
    path = _save(source.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(1)
    loaded = build_backbone(name, num_classes=7, image_size=image_size, pretrained_path=path, **kwargs).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source.features(x), rtol=0, atol=0)
    assert loaded.head.out_features == 7  # the head is never taken from the file


def test_pretrained_unwraps_and_strips_prefixes(tmp_path: Path) -> None:
    source = build_backbone("resnet18", num_classes=10, cifar_stem=True).eval()
    inner = {f"module.backbone.{k}": v for k, v in source.encoder.state_dict().items()}
    inner["module.backbone.fc.weight"] = torch.zeros(10, 512)
    for wrapper in ("state_dict", "model"):
        path = _save({wrapper: inner, "epoch": 3}, tmp_path / f"{wrapper}.pt")
        fresh = build_backbone("resnet18", num_classes=10, cifar_stem=True)
        report = fresh.load_pretrained(path)
        assert report.ignored == ["fc.weight"]
        assert report.sha256 == sha256_of_file(path)
        fresh.eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fresh.features(x), source.features(x), rtol=0, atol=0)


def test_pretrained_scan_style_resnet(tmp_path: Path) -> None:
    # SCAN: `backbone.` prefix, `shortcut` instead of `downsample`, a contrastive head to ignore.
    source = build_backbone("resnet18", num_classes=10, cifar_stem=True)
    state = {
        "backbone." + k.replace(".downsample.", ".shortcut."): v
        for k, v in source.encoder.state_dict().items()
    }
    state["contrastive_head.0.weight"] = torch.zeros(512, 512)
    path = _save(state, tmp_path / "scan.pth.tar")
    fresh = build_backbone("resnet18", num_classes=10, cifar_stem=True)
    report = fresh.load_pretrained(path)
    assert report.ignored == ["contrastive_head.0.weight"]
    torch.testing.assert_close(
        fresh.encoder.layer2[0].downsample[0].weight, source.encoder.layer2[0].downsample[0].weight
    )


def test_pretrained_usb_style_wrn(tmp_path: Path) -> None:
    source = build_backbone("wrn28_2", num_classes=10)
    usb: dict[str, torch.Tensor] = {}
    for key, value in source.state_dict().items():
        key = re.sub(r"^stem\.", "conv1.", key)
        key = re.sub(r"^bn_out\.", "bn1.", key)
        key = re.sub(r"^(block\d+)\.", r"\1.layer.", key)
        key = key.replace(".shortcut.", ".convShortcut.").replace("head.", "fc.")
        usb[key] = value
    path = _save({"model": {f"module.{k}": v for k, v in usb.items()}}, tmp_path / "usb.pth")
    fresh = build_backbone("wrn28_2", num_classes=10, pretrained_path=path)
    torch.testing.assert_close(fresh.block3[0].shortcut.weight, source.block3[0].shortcut.weight)


def test_pretrained_safetensors(tmp_path: Path) -> None:
    source = build_backbone("small_cnn", num_classes=10, in_channels=1).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    fresh = build_backbone("small_cnn", num_classes=10, in_channels=1, pretrained_path=str(path)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.features(x), source.features(x), rtol=0, atol=0)


def test_pretrained_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_backbone("resnet18", num_classes=10, pretrained_path=str(path))


def test_pretrained_key_problems_fail_loudly(tmp_path: Path) -> None:
    state = build_backbone("small_cnn", num_classes=10, in_channels=1).state_dict()
    missing = {k: v for k, v in state.items() if k != "body.0.weight"}
    with pytest.raises(RuntimeError, match=r"missing \(1\): body\.0\.weight"):
        build_backbone("small_cnn", 10, 1, pretrained_path=_save(missing, tmp_path / "a.pt"))
    extra = dict(state, **{"projector.weight": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"unexpected \(1\): projector\.weight"):
        build_backbone("small_cnn", 10, 1, pretrained_path=_save(extra, tmp_path / "b.pt"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        build_backbone("small_cnn", 10, 3, pretrained_path=_save(state, tmp_path / "c.pt"))


def test_pretrained_sha256(tmp_path: Path) -> None:
    state = build_backbone("small_cnn", num_classes=10, in_channels=1).state_dict()
    path = _save(state, tmp_path / "w.pt")
    digest = sha256_of_file(path)
    build_backbone("small_cnn", 10, 1, pretrained_path=path, pretrained_sha256=digest.upper())
    with pytest.raises(ValueError, match="sha256 mismatch"):
        build_backbone("small_cnn", 10, 1, pretrained_path=path, pretrained_sha256="0" * 64)
    with pytest.raises(ValueError, match="without pretrained_path"):
        build_backbone("small_cnn", 10, 1, pretrained_sha256=digest)


def test_vit_pos_embed_is_resampled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # A 4×4 patch grid in the file (16 px, patch 4), an 8×8 grid in the model (32 px, patch 4).
    small = build_backbone("vit_tiny", num_classes=10, image_size=16, patch_size=4, depth=1)
    path = _save({"model": small.encoder.state_dict()}, tmp_path / "vit.pth")
    big = build_backbone(
        "vit_tiny", num_classes=10, image_size=32, patch_size=4, depth=1, pretrained_path=path
    )
    file_pos = small.encoder.pos_embed.detach()
    assert big.encoder.pos_embed.shape == (1, 1 + 64, 192)
    expected = resample_abs_pos_embed(file_pos, new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(big.encoder.pos_embed.detach(), expected)
    torch.testing.assert_close(big.encoder.pos_embed[:, :1].detach(), file_pos[:, :1])  # CLS untouched
    torch.testing.assert_close(big.encoder.cls_token, small.encoder.cls_token)
    with torch.no_grad():
        assert big.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)

    with pytest.raises(RuntimeError, match="patch embedding kernel"):
        build_backbone("vit_tiny", num_classes=10, image_size=32, patch_size=2, depth=1, pretrained_path=path)


def test_vit_defaults() -> None:
    vit = build_backbone("vit_small", num_classes=10, image_size=32, depth=1)
    assert vit.patch_size == 2 and vit.num_features == 384
    assert vit.encoder.patch_embed.grid_size == (16, 16)
    assert build_backbone("vit_base", num_classes=10, image_size=96, depth=1).patch_size == 16
    dp = build_backbone("vit_tiny", num_classes=10, drop_path_rate=0.1, depth=2)
    assert dp.encoder.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        build_backbone("vit_tiny", num_classes=10, image_size=30, patch_size=4, depth=1)


# ---------------------------------------------------------------- projection head


def test_projection_head() -> None:
    head = ProjectionHead(16, 32, 8)
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(4, 16)).shape == (4, 8)

    no_bn = ProjectionHead(16, 16, 8, num_layers=3, batch_norm=False, normalize=True)
    assert [type(m) for m in no_bn.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    z = no_bn(torch.randn(5, 16))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    # A zero row must stay finite rather than divide by zero.
    with torch.no_grad():
        for p in no_bn.parameters():
            p.zero_()
    assert torch.isfinite(no_bn(torch.randn(2, 16))).all()

    single = ProjectionHead(16, 99, 8, num_layers=1)
    assert len(single.net) == 1 and isinstance(single.net[0], nn.Linear)
