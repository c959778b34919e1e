"""Fixed-feature DataModule: the on-disk cache (write once, reuse, invalidate), its errors, and that the
cached rows are the backbone's eval-mode features of the preprocessed images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ssl_lightning.data.features as features_module
from ssl_lightning.data.digits import digits_arrays
from ssl_lightning.data.features import FEATURE_DATASETS, FixedFeatureDataModule, preprocess_images
from ssl_lightning.nets import build_backbone
from ssl_lightning.nets.pretrained import PretrainedWeightsError

# A narrow digits CNN keeps every extraction to a fraction of a second; 16-d features.
WIDTHS = (8, 16)


def _save_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_backbone("small_cnn", num_classes=0, in_channels=3, widths=WIDTHS)
    # Non-trivial BN statistics: eval-mode features then differ visibly from train-mode ones.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return _save_weights(tmp_path / "small_cnn.pth", seed=0)


def _datamodule(tmp_path: Path, weights: Path | None, **kwargs: Any) -> FixedFeatureDataModule:
    settings: dict[str, Any] = {
        "dataset": "digits", "feature_backbone": "small_cnn", "feature_image_size": 16, "feature_batch_size": 500,
        "feature_backbone_args": {"widths": list(WIDTHS)},
        "feature_weights": None if weights is None else str(weights), "cache_dir": str(tmp_path / "cache"),
        "data_dir": str(tmp_path), "batch_size": 8, "mu": 1, "num_labels": None,
        "labeled_views": ["identity"], "unlabeled_views": ["identity"],
    }
    return FixedFeatureDataModule(**(settings | kwargs))


class _CountingExtractor:
    """Wraps ``extract_features`` and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = features_module.extract_features

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        return self.original(*args, **kwargs)


def _no_extraction(*args: Any, **kwargs: Any) -> np.ndarray:
    raise AssertionError("features were computed again although a valid cache exists")


def test_cache_is_written_once_then_reused(tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _CountingExtractor()
    monkeypatch.setattr(features_module, "extract_features", counter)
    first = _datamodule(tmp_path, weights)
    first.setup("fit")
    assert counter.calls == 2  # train and test
    cache = tmp_path / "cache"
    arrays, metas = sorted(cache.glob("*.npy")), sorted(cache.glob("*.json"))
    assert [p.stem for p in arrays] == [p.stem for p in metas] and len(arrays) == 2
    meta = json.loads(metas[1].read_text())
    assert meta["split"] == "train" and meta["dataset"] == "digits" and meta["feature_backbone"] == "small_cnn"
    assert meta["shape"] == [1437, 16] and meta["feature_backbone_args"] == {"widths": [8, 16]} and meta["preprocessing"]["resize"]["size"] == 16
    assert meta["weights_sha256"] == features_module.sha256_of_file(weights)
    assert meta["torchvision_version"] and not list(cache.glob(".*tmp"))

    monkeypatch.setattr(features_module, "extract_features", _no_extraction)
    second = _datamodule(tmp_path, weights)
    second.setup("fit")
    np.testing.assert_array_equal(second.train_features()[0], first.train_features()[0])
    np.testing.assert_array_equal(second.test_features()[0], first.test_features()[0])
    assert second.feature_cache_sha256 == first.feature_cache_sha256
    assert len(second.feature_cache_sha256) == 64


def test_a_changed_weights_file_invalidates_the_cache(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _datamodule(tmp_path, weights)
    first.setup("fit")
    _save_weights(weights, seed=1)  # same path, other contents
    counter = _CountingExtractor()
    monkeypatch.setattr(features_module, "extract_features", counter)
    second = _datamodule(tmp_path, weights)
    second.setup("fit")
    assert counter.calls == 2
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    assert second.feature_cache_sha256 != first.feature_cache_sha256
    assert not np.allclose(second.train_features()[0], first.train_features()[0])


def test_a_changed_preprocessing_invalidates_the_cache(tmp_path: Path, weights: Path) -> None:
    small = _datamodule(tmp_path, weights)
    small.setup("fit")
    large = _datamodule(tmp_path, weights, feature_image_size=24)
    large.setup("fit")
    assert large.feature_cache_sha256 != small.feature_cache_sha256
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_a_corrupted_cache_is_computed_again(tmp_path: Path, weights: Path) -> None:
    first = _datamodule(tmp_path, weights)
    first.setup("fit")
    (train_array,) = (tmp_path / "cache").glob("digits_train_*.npy")
    edited = np.load(train_array)
    edited[0, 0] += 1.0
    np.save(train_array, edited)
    second = _datamodule(tmp_path, weights)
    with pytest.warns(UserWarning, match="sha256"):
        second.setup("fit")
    np.testing.assert_array_equal(second.train_features()[0], first.train_features()[0])
    np.testing.assert_array_equal(np.load(train_array), first.train_features()[0])


def test_features_equal_a_direct_eval_mode_forward(tmp_path: Path, weights: Path) -> None:
    dm = _datamodule(tmp_path, weights)
    train_x, train_y = dm.train_features()
    test_x, test_y = dm.test_features()
    images_train, targets_train, images_test, targets_test = digits_arrays()
    model = build_backbone("small_cnn", num_classes=0, in_channels=3, widths=WIDTHS, pretrained_path=str(weights))
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for images, cached in ((images_train, train_x), (images_test, test_x)):
        # 16 px digits at feature_image_size=16: no resize, grey repeated, ImageNet statistics.
        x = (torch.from_numpy(images).float().div(255).repeat(1, 3, 1, 1) - mean) / std
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(train_y, targets_train)
    np.testing.assert_array_equal(test_y, targets_test)
    # Eval mode matters: train-mode BatchNorm would give other features.
    with torch.no_grad():
        train_mode = model.train()((torch.from_numpy(images_test).float().div(255).repeat(1, 3, 1, 1) - mean) / std)
    assert not np.allclose(test_x, train_mode.numpy(), atol=1e-3)


def test_datamodule_serves_feature_vectors_to_a_linear_head(tmp_path: Path, weights: Path) -> None:
    dm = _datamodule(tmp_path, weights, labeled_views=["weak"], unlabeled_views=["test", "affine"])
    assert (dm.in_channels, dm.image_size, dm.num_classes, dm.dataset_key) == (16, 1, 10, "digits")
    with pytest.warns(UserWarning, match="no augmentation"):
        loaders = dm.train_dataloader()
    batch = dm.on_after_batch_transfer({name: next(iter(loader)) for name, loader in loaders.items()}, 0)
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    assert tuple(labeled.views[0].shape) == (8, 16) and labeled.views[0].dtype == torch.float32
    # Identity views: both unlabeled "views" are the cached rows of the drawn indices.
    features = torch.from_numpy(dm.train_features()[0])
    for view in unlabeled.views:
        torch.testing.assert_close(view, features[unlabeled.indices], rtol=0, atol=0)
    head = build_backbone("mlp", num_classes=dm.num_classes, in_channels=dm.in_channels, image_size=dm.image_size)
    assert tuple(head(labeled.views[0]).shape) == (8, 10)
    test_batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert tuple(test_batch.views[0].shape) == (256, 16)  # the default eval batch


def test_missing_weights_file_names_the_path_and_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "resnet50-0676ba61.pth"
    with pytest.raises(PretrainedWeightsError, match="--data.feature_weights") as info:
        _datamodule(tmp_path, missing)
    assert str(missing) in str(info.value)


def test_weights_file_removed_after_construction_fails_at_setup(tmp_path: Path, weights: Path) -> None:
    dm = _datamodule(tmp_path, weights)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="--data.feature_weights"):
        dm.setup("fit")


def test_no_weights_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--data.feature_weights=.*IMAGENET1K_V1.*--data.feature_random_init"):
        _datamodule(tmp_path, None)


def test_random_init_is_seeded_and_keyed_apart(tmp_path: Path, weights: Path) -> None:
    first = _datamodule(tmp_path / "a", None, feature_random_init=True)
    second = _datamodule(tmp_path / "b", None, feature_random_init=True)
    np.testing.assert_array_equal(first.train_features()[0], second.train_features()[0])
    meta = json.loads(next((tmp_path / "a" / "cache").glob("digits_train_*.json")).read_text())
    assert meta["weights_sha256"] == "random-init-seed0"
    with pytest.raises(ValueError, match="contradict"):
        _datamodule(tmp_path, weights, feature_random_init=True)


def test_dataset_table_maps_to_the_image_datamodules(tmp_path: Path) -> None:
    expected = {"mnist": (10, "mnist"), "cifar10": (10, "cifar10"), "cifar100_20": (20, "cifar100_20"),
                "stl10": (10, "stl10"), "digits": (10, "digits")}
    assert set(FEATURE_DATASETS) == set(expected)
    for name, (classes, key) in expected.items():
        dm = FixedFeatureDataModule(dataset=name, feature_backbone="small_cnn", feature_random_init=True,  # type: ignore[arg-type]
                                    data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
        assert (dm.num_classes, dm.dataset_key) == (classes, key)
    stl = FixedFeatureDataModule(dataset="stl10", feature_random_init=True, data_dir=str(tmp_path))
    assert stl.image_datamodule.use_unlabeled_split is False
    # The default backbone is ResNet-50: 2048-d features, known without building real weights.
    assert stl.in_channels == 2048 and stl.feature_image_size == 224
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        FixedFeatureDataModule(dataset="svhn", feature_random_init=True)  # type: ignore[arg-type]


def test_preprocessing_repeats_grey_resizes_and_normalises() -> None:
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = preprocess_images(images, 224)
    assert tuple(x.shape) == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).repeat(1, 3, 32, 1)
    resized = preprocess_images(ramp, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    reference = torch.nn.functional.interpolate(ramp.float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, (reference - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
