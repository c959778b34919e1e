"""Every DataModule on generated files in the official formats, and the stream/sampler contracts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    STL10DataModule,
    SVHNDataModule,
)
from ssl_lightning.data.formats import DatasetNotFoundError
from ssl_lightning.data.module import SSLDataModule, StreamBatch
from ssl_lightning.data.sampling import GlobalBatchStream, ShardedEvalSampler

CASES = [
    # (class, kwargs, num_classes, channels, size, train pool, test, extra unlabeled)
    (MNISTDataModule, {}, 10, 1, 28, 200, 100, 0),
    (CIFAR10DataModule, {}, 10, 3, 32, 200, 100, 0),
    (CIFAR100DataModule, {}, 100, 3, 32, 200, 100, 0),
    (CIFAR100DataModule, {"superclasses": True}, 20, 3, 32, 200, 100, 0),
    (SVHNDataModule, {}, 10, 3, 32, 100, 100, 0),
    (SVHNDataModule, {"use_extra": True}, 10, 3, 32, 200, 100, 0),
    (STL10DataModule, {}, 10, 3, 96, 200, 100, 100),
]


def _first_batch(dm: SSLDataModule) -> dict[str, StreamBatch]:
    loaders = dm.train_dataloader()
    raw = {name: next(iter(loader)) for name, loader in loaders.items()}
    return dm.on_after_batch_transfer(raw, 0)


@pytest.mark.parametrize(("cls", "kwargs", "classes", "channels", "size", "pool", "test", "extra"), CASES)
def test_datamodule_on_official_format(
    fixture_data: Path, tmp_path: Path, cls: type[SSLDataModule], kwargs: dict, classes: int, channels: int,
    size: int, pool: int, test: int, extra: int,
) -> None:
    num_labels = classes if classes > 10 else 20
    dm = cls(data_dir=str(fixture_data), batch_size=4, mu=2, eval_batch_size=16, num_labels=num_labels,
             num_workers=0, labeled_views=["weak"], unlabeled_views=["weak", "strong"], seed=0, **kwargs)
    assert dm.num_classes == classes and dm.in_channels == channels and dm.image_size == size
    dm.setup("fit")
    assert len(dm.sources.train) == pool and len(dm.sources.test) == test
    assert len(dm.split.labeled_indices) == num_labels
    assert len(dm._unlabeled_indices) == pool + extra
    batch = _first_batch(dm)
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    assert [tuple(v.shape) for v in labeled.views] == [(4, channels, size, size)]
    assert [tuple(v.shape) for v in unlabeled.views] == [(8, channels, size, size)] * 2
    assert labeled.views[0].dtype == torch.float32
    assert int(labeled.targets.min()) >= 0 and int(labeled.targets.max()) < classes
    eval_batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert tuple(eval_batch.views[0].shape) == (16, channels, size, size)


def test_imagenet_folder_datamodule(fixture_data: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(fixture_data / "imagenet"), num_classes=3, image_size=48, train_resize=64,
                            batch_size=3, mu=1, eval_batch_size=4, num_labels=3, num_workers=0,
                            labeled_views=["weak"], unlabeled_views=["weak"], seed=0)
    dm.setup("fit")
    batch = _first_batch(dm)
    assert tuple(batch["labeled"].views[0].shape) == (3, 3, 48, 48)
    eval_batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert tuple(eval_batch.views[0].shape) == (4, 3, 48, 48)


def test_missing_dataset_names_path_and_download(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), num_labels=40)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "download" in message


def test_digits_recipe() -> None:
    dm = DigitsDataModule(seed=0)
    dm.request_views(["weak"], ["weak", "strong"])
    dm.setup("fit")
    assert len(dm.sources.train) == 1437 and len(dm.sources.test) == 360
    assert np.bincount(dm.split.labeled_targets).tolist() == [4] * 10
    assert dm.sources.train.load(0).shape == (1, 16, 16)
    # The split does not depend on the run seed.
    other = DigitsDataModule(seed=5)
    other.setup("fit")
    assert np.array_equal(dm.split.labeled_indices, other.split.labeled_indices)


def test_explicit_views_win_over_method_request() -> None:
    dm = DigitsDataModule(unlabeled_views=["weak"])
    dm.request_views(["weak"], ["weak", "strong", "strong"])
    assert dm.unlabeled_views == ["weak"] and dm.labeled_views == ["weak"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_is_world_size_invariant(world_size: int) -> None:
    indices = np.arange(37)
    single = GlobalBatchStream(indices, 8, seed=3)
    ranks = [GlobalBatchStream(indices, 8, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
    for step in range(12):
        combined = [draw for rank in ranks for draw in rank.batch_at(step)]
        assert combined == single.batch_at(step)


def test_stream_covers_each_pass_once_and_resumes() -> None:
    stream = GlobalBatchStream(np.arange(10, 20), 5, seed=1)
    first_pass = [i for step in range(2) for i, _ in stream.batch_at(step)]
    assert sorted(first_pass) == list(range(10, 20))
    resumed = GlobalBatchStream(np.arange(10, 20), 5, seed=1, start_step=3)
    iterator = iter(resumed)
    assert next(iterator) == stream.batch_at(3)


def test_augmentations_do_not_depend_on_workers() -> None:
    def views(num_workers: int) -> list[torch.Tensor]:
        dm = DigitsDataModule(seed=2, num_workers=num_workers, labeled_views=["strong"], unlabeled_views=["strong"])
        dm.setup("fit")
        iterator = iter(dm.train_dataloader()["unlabeled"])
        return [next(iterator)[0] for _ in range(2)]

    for a, b in zip(views(0), views(2), strict=True):
        assert torch.equal(a, b)


def test_eval_shards_cover_without_duplicates() -> None:
    shards = [list(ShardedEvalSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_validation_split_is_carved_from_training_pool() -> None:
    dm = DigitsDataModule(val_size=100, seed=0)
    dm.request_views(["weak"], ["weak"])
    dm.setup("fit")
    assert dm.eval_streams == ["val", "test"]
    val = set(dm.split.val_indices.tolist())
    assert len(val) == 100
    assert not val & set(dm.split.labeled_indices.tolist())
    assert not val & set(dm._unlabeled_indices.tolist())
    assert len(dm.val_dataloader()) == 2


def test_derived_strong_views_share_the_weak_crop() -> None:
    dm = DigitsDataModule(seed=0, cutout=0.0, randaug_ops=0, labeled_views=["weak"],
                          unlabeled_views=["weak", "strong@weak", "strong@weak", "strong"])
    dm.setup("fit")
    iterator = iter(dm.train_dataloader()["unlabeled"])
    for _ in range(3):
        weak, derived_a, derived_b, independent, *_ = next(iterator)
        # With no RandAugment ops and no Cutout, a derived strong view is its base image exactly.
        assert torch.equal(weak, derived_a) and torch.equal(weak, derived_b)
    assert not torch.equal(weak, independent)


def test_derived_view_needs_an_earlier_base() -> None:
    dm = DigitsDataModule(unlabeled_views=["strong@weak", "weak"], labeled_views=["weak"])
    dm.setup("fit")
    with pytest.raises(ValueError, match="earlier"):
        dm.train_dataloader()


def test_imagenet_normalisation_for_pretrained_weights() -> None:
    """Pretrained ViTs expect ImageNet statistics; grey images get their RGB mean."""
    rgb = CIFAR10DataModule(normalization="imagenet")
    image = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(rgb.normalize(image)[0, :, 0, 0], expected)
    grey = DigitsDataModule(normalization="imagenet")
    assert grey.mean == pytest.approx((0.449,)) and grey.std == pytest.approx((0.226,))
    assert DigitsDataModule().mean != grey.mean  # the dataset's own statistics by default


def test_labeled_subset_and_unlabeled_epoch() -> None:
    data = DigitsDataModule(num_labels=40, batch_size=16, mu=3)
    indices, labels = data.labeled_subset()
    assert len(indices) == 40 and np.bincount(labels).tolist() == [4] * 10
    assert data.unlabeled_epoch_steps() == 1437 // 48
