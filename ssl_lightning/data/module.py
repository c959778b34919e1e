"""The DataModule family shared by every method.

A concrete DataModule only says where its images come from (``build_sources``) and how they are
normalised; this base owns the label protocol, the view lists, the per-rank batch sizes derived from
the global batch, the endless seeded training streams and the evaluation loaders.

Batches reach a method as ``{"labeled": StreamBatch, "unlabeled": StreamBatch}`` during training and
as a single ``StreamBatch`` during evaluation, already on the device, as normalised float tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.data.sampling import (
    Draw,
    GlobalBatchStream,
    ShardedEvalSampler,
    augmentation_seed,
    with_private_rng,
)
from ssl_lightning.data.sources import ConcatSource, ImageSource, SubsetSource
from ssl_lightning.data.splits import Split, SplitSpec, load_or_create_split
from ssl_lightning.data.views import DerivedView, ViewConfig, build_view, build_views

LABELED_STREAM, UNLABELED_STREAM = 0, 1
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


class StreamBatch(NamedTuple):
    """One stream's batch: a tensor per requested view, the targets and the source indices.

    For the unlabeled stream ``targets`` are the hidden true labels (``-1`` where none exist); only
    diagnostics may read them.
    """

    views: list[torch.Tensor]
    targets: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True)
class Sources:
    """What a concrete DataModule provides: the training pool, the test set, and optional extras."""

    train: ImageSource
    test: ImageSource
    # Images that only ever join the unlabeled pool (STL-10 ``unlabeled``); appended after ``train``.
    extra_unlabeled: ImageSource | None = None


class ViewDataset(Dataset):
    """Applies a list of views to images of a source; items are ``(*views, target, index)``."""

    def __init__(
        self,
        source: ImageSource,
        views: list[Any],
        targets: np.ndarray | None = None,
        run_seed: int = 0,
        stream_id: int = 0,
    ) -> None:
        self.source = source
        self.views = views
        self.targets = source.targets if targets is None else targets
        self.run_seed = run_seed
        self.stream_id = stream_id

    def __len__(self) -> int:
        return len(self.source)

    def _apply_views(self, image: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for view in self.views:
            outputs.append(view.apply(outputs) if isinstance(view, DerivedView) else view(image))
        return outputs

    def _item(self, index: int, draw: int | None) -> tuple:
        image = self.source.load(index)
        if draw is not None:
            # The CPU generator alone: torch.manual_seed would also visit every accelerator backend.
            torch.default_generator.manual_seed(augmentation_seed(self.run_seed, self.stream_id, draw))
        return (*self._apply_views(image), int(self.targets[index]), index)

    def __getitem__(self, item: int | Draw) -> tuple:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int | Draw]) -> list[tuple]:
        # Seeding per draw makes each sample's augmentation a function of its stream position alone;
        # the caller's generator state is saved once per batch, not once per sample.
        draws = [item if isinstance(item, tuple) else (item, None) for item in items]
        return with_private_rng(lambda: [self._item(index, draw) for index, draw in draws])


class _LabelOverride(ImageSource):
    """The training source with the split's (possibly noisy) labels in place of the true ones."""

    def __init__(self, source: ImageSource, indices: np.ndarray, labels: np.ndarray) -> None:
        self.source = source
        self.targets = source.targets.copy()
        self.targets[indices] = labels
        self.num_channels = source.num_channels

    def load(self, index: int) -> torch.Tensor:
        return self.source.load(index)


class SSLDataModule(LightningDataModule):
    """Base of all DataModules: label protocol, views, global-batch streams, evaluation loaders.

    Args:
        data_dir: root under which the dataset's official files live (and split files are kept).
        download: fetch the dataset with torchvision when its files are missing.
        batch_size: global labeled batch ``B`` (split evenly across ranks).
        mu: unlabeled-to-labeled ratio; the global unlabeled batch is ``mu * B``.
        eval_batch_size: global batch for validation and test.
        num_labels: class-balanced labeled count (``None``: every training image is labeled).
        label_fraction: per-class labeled fraction instead of ``num_labels``.
        imbalance_ratio: long-tailed labeled subset with ratio rho (head class 0).
        max_per_class: head-class count ``N_1`` of the long tail.
        noise_rate: symmetric label noise on the labeled subset.
        val_size: class-balanced validation split carved from the training pool (0: none).
        unlabeled: ``all`` (training pool incl. labeled images), ``rest`` or ``none``.
        split_seed: seed of the label split, independent of the run seed.
        labeled_views / unlabeled_views: views per stream; ``None`` takes what the method declares.
        crop_pad, hflip, randaug_ops, cutout: the view recipe (``None``: the dataset's default).
        num_workers: DataLoader workers per rank.
        seed: stream and augmentation seed; ``None`` follows ``seed_everything``.
        normalization: ``dataset`` (this dataset's mean and std) or ``imagenet`` (the statistics that
            ImageNet-pretrained weights expect).
    """

    name: str = "dataset"
    num_classes: int = 0
    in_channels: int = 3
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    default_hflip: bool = True

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        mu: int = 7,
        eval_batch_size: int = 256,
        num_labels: int | None = None,
        label_fraction: float | None = None,
        imbalance_ratio: float | None = None,
        max_per_class: int = 1500,
        noise_rate: float = 0.0,
        val_size: int = 0,
        unlabeled: str = "all",
        split_seed: int = 0,
        labeled_views: list[str] | None = None,
        unlabeled_views: list[str] | None = None,
        crop_pad: int | None = None,
        hflip: bool | None = None,
        randaug_ops: int = 3,
        cutout: float = 0.5,
        num_workers: int = 2,
        seed: int | None = None,
        normalization: Literal["dataset", "imagenet"] = "dataset",
    ) -> None:
        super().__init__()
        if normalization == "imagenet":
            channels = slice(None) if self.in_channels == 3 else slice(0, 0)
            # Grey images: the mean over RGB of ImageNet's statistics.
            self.mean = IMAGENET_MEAN[channels] or (sum(IMAGENET_MEAN) / 3,)
            self.std = IMAGENET_STD[channels] or (sum(IMAGENET_STD) / 3,)
        if unlabeled not in ("all", "rest", "none"):
            raise ValueError(f"unlabeled must be 'all', 'rest' or 'none', got {unlabeled!r}")
        self.data_dir = Path(data_dir)
        self.download = download
        self.batch_size = batch_size
        self.mu = mu
        self.eval_batch_size = eval_batch_size
        self.split_spec = SplitSpec(
            num_labels=num_labels,
            label_fraction=label_fraction,
            imbalance_ratio=imbalance_ratio,
            max_per_class=max_per_class,
            noise_rate=noise_rate,
            val_size=val_size,
            unlabeled=unlabeled,
            split_seed=split_seed,
        )
        self.labeled_views = labeled_views
        self.unlabeled_views = unlabeled_views
        self.view_config = ViewConfig(
            image_size=self.image_size,
            crop_pad=round(0.125 * self.image_size) if crop_pad is None else crop_pad,
            hflip=self.default_hflip if hflip is None else hflip,
            randaug_ops=randaug_ops,
            cutout=cutout,
        )
        self.num_workers = num_workers
        self._seed = seed
        self.sources: Sources | None = None
        self.split: Split | None = None

    # ----- what a concrete dataset provides -------------------------------------------------------
    def build_sources(self) -> Sources:
        raise NotImplementedError

    @property
    def dataset_key(self) -> str:
        """Name used for split files; includes anything that changes the training pool."""
        return self.name

    # ----- protocol ----------------------------------------------------------------------------------
    def request_views(self, labeled: list[str], unlabeled: list[str]) -> None:
        """Called by a method with the views it needs; explicit config values take precedence."""
        if self.labeled_views is None:
            self.labeled_views = list(labeled)
        if self.unlabeled_views is None:
            self.unlabeled_views = list(unlabeled)

    @property
    def run_seed(self) -> int:
        if self._seed is not None:
            return self._seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def prepare_data(self) -> None:
        # Downloads happen once (rank 0) before setup runs everywhere.
        if self.download:
            self.build_sources()

    def setup(self, stage: str | None = None) -> None:
        if self.sources is not None:
            return
        self.sources = self.build_sources()
        self.split = load_or_create_split(
            self.sources.train.targets,
            self.num_classes,
            self.split_spec,
            directory=self.data_dir / "splits",
            dataset=self.dataset_key,
        )
        self._labeled_source = _LabelOverride(
            self.sources.train, self.split.labeled_indices, self.split.labeled_targets
        )
        unlabeled_indices = self.split.unlabeled_indices
        self._unlabeled_source: ImageSource = self.sources.train
        if self.sources.extra_unlabeled is not None and self.split_spec.unlabeled != "none":
            self._unlabeled_source = ConcatSource([self.sources.train, self.sources.extra_unlabeled])
            extra = np.arange(len(self.sources.extra_unlabeled), dtype=np.int64) + len(self.sources.train)
            unlabeled_indices = np.concatenate([unlabeled_indices, extra])
        self._unlabeled_indices = unlabeled_indices

    def labeled_subset(self) -> tuple[np.ndarray, np.ndarray]:
        """Pool indices of the labeled examples (what ``StreamBatch.indices`` holds) and the labels the
        model trains on (noisy under label noise), for methods that keep per-example state."""
        self.setup()
        assert self.split is not None
        return self.split.labeled_indices, self.split.labeled_targets

    def unlabeled_epoch_steps(self) -> int:
        """⌊|U| / μB⌋: optimiser steps in one pass over the unlabeled pool."""
        self.setup()
        return len(self._unlabeled_indices) // max(1, self.mu * self.batch_size)

    # ----- loaders -----------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.global_step

    def _views(self, names: list[str] | None, stream: str) -> list[Any]:
        if not names:
            raise ValueError(
                f"no views configured for the {stream} stream: set --data.{stream}_views "
                "or attach the DataModule to a method that declares its views"
            )
        return build_views(names, self.view_config)

    def _stream_loader(self, source: ImageSource, indices: np.ndarray, views: list[Any], global_batch: int,
                       stream_id: int) -> DataLoader:
        rank, world_size, step = self._world()
        dataset = ViewDataset(source, views, run_seed=self.run_seed, stream_id=stream_id)
        sampler = GlobalBatchStream(
            indices, global_batch, rank=rank, world_size=world_size, seed=self.run_seed,
            stream_id=stream_id, start_step=step,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        assert self.split is not None
        loaders: dict[str, DataLoader] = {}
        # Without labels (self-labelled clustering) the unlabeled stream is the only one.
        if len(self.split.labeled_indices) > 0:
            loaders["labeled"] = self._stream_loader(
                self._labeled_source, self.split.labeled_indices,
                self._views(self.labeled_views, "labeled"), self.batch_size, LABELED_STREAM,
            )
        if self.mu > 0 and self.unlabeled_views and len(self._unlabeled_indices) > 0:
            loaders["unlabeled"] = self._stream_loader(
                self._unlabeled_source, self._unlabeled_indices,
                self._views(self.unlabeled_views, "unlabeled"), self.mu * self.batch_size, UNLABELED_STREAM,
            )
        return loaders

    def _eval_loader(self, source: ImageSource) -> DataLoader:
        rank, world_size, _ = self._world()
        if self.eval_batch_size % world_size != 0:
            raise ValueError(f"eval_batch_size {self.eval_batch_size} is not divisible by world size {world_size}")
        return DataLoader(
            ViewDataset(source, [build_view("test", self.view_config)]),
            batch_size=self.eval_batch_size // world_size,
            sampler=ShardedEvalSampler(len(source), rank, world_size),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    @property
    def eval_streams(self) -> list[str]:
        """Names of the validation dataloaders, in order: the carved ``val`` split (if any), then ``test``.

        The test stream is monitored during training (as the papers do) but never used for selection.
        """
        return (["val"] if self.split_spec.val_size > 0 else []) + ["test"]

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        assert self.sources is not None and self.split is not None
        loaders = []
        if self.split_spec.val_size > 0:
            loaders.append(self._eval_loader(SubsetSource(self.sources.train, self.split.val_indices)))
        loaders.append(self._eval_loader(self.sources.test))
        return loaders

    def test_dataloader(self) -> DataLoader:
        self.setup()
        assert self.sources is not None
        return self._eval_loader(self.sources.test)

    # ----- device-side conversion ---------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → normalised float32, on whatever device the images are on.

        Floating-point inputs (a :class:`~ssl_lightning.data.sources.FeatureSource`) pass through unchanged.
        """
        if images.is_floating_point():
            return images
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def _to_stream_batch(self, items: list[torch.Tensor]) -> StreamBatch:
        *views, targets, indices = items
        return StreamBatch([self.normalize(v) for v in views], targets, indices)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            return {name: self._to_stream_batch(items) for name, items in batch.items()}
        return self._to_stream_batch(batch)

