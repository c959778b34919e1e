"""The DataModule family shared by every method.

A concrete DataModule only says where its images come from (``build_sources``) and how they are
normalised; this base owns the label protocol, the view lists, the per-rank batch sizes derived from
the global batch, the endless seeded training streams and the evaluation loaders.

Batches reach a method as ``{"labeled": StreamBatch, "unlabeled": StreamBatch}`` during training and
as a single ``StreamBatch`` during evaluation, already on the device, as normalised float tensors.

Optionally the labeled pool also carries *soft* targets (the soft-label robustness experiment of the
collision-CE spec, §6.3): ``y_i = (1 − ε) e_{c_i} + ε r_i`` with ``r_i ~ Dir(1_K)`` or ``r_i = u``, drawn
once per (dataset, split, noise, ε, seed) and kept next to the split file with a sha256, like a split.
"""

from __future__ import annotations

import hashlib
import io
import json
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
from ssl_lightning.data.splits import (
    Split,
    SplitFileError,
    SplitSpec,
    canonical_json,
    load_or_create_split,
    payload_sha256,
    write_bytes_atomic,
)
from ssl_lightning.data.views import DerivedView, ViewConfig, build_view, build_views

LABELED_STREAM, UNLABELED_STREAM = 0, 1
SoftLabelNoise = Literal["none", "dirichlet", "uniform"]
SOFT_LABEL_NOISES: tuple[str, ...] = ("none", "dirichlet", "uniform")
SOFT_LABEL_FORMAT = 1
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


# ----- soft labels -------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in NumPy's ``.npy`` format, as bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the raw C-order bytes of ``array`` (independent of the ``.npy`` header layout)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def draw_soft_labels(
    labels: np.ndarray, num_classes: int, noise: SoftLabelNoise, epsilon: float, seed: int
) -> np.ndarray:
    """Soft targets ``y_i = (1 − ε) e_{c_i} + ε r_i``, float32 ``(n, K)``, rows on the simplex.

    ``dirichlet``: ``r_i ~ Dir(1_K)`` (uniform on the simplex), so for large ε the argmax may leave the
    true class. ``uniform``: ``r_i = u`` (label smoothing; the argmax stays correct for ε < 1). The
    Dirichlet rows come from ``np.random.default_rng(seed)`` whatever ε is, so an ε sweep at one seed
    moves every label along the same direction. Computed in float64, stored in float32.
    """
    if noise not in ("dirichlet", "uniform"):
        raise ValueError(f"soft-label noise must be 'dirichlet' or 'uniform', got {noise!r}")
    labels = np.asarray(labels, dtype=np.int64)
    count = len(labels)
    one_hot = np.zeros((count, num_classes), dtype=np.float64)
    one_hot[np.arange(count), labels] = 1.0
    if noise == "dirichlet":
        directions = np.random.default_rng(seed).dirichlet(np.ones(num_classes), size=count)
    else:
        directions = np.full((count, num_classes), 1.0 / num_classes)
    return ((1.0 - epsilon) * one_hot + epsilon * directions).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SoftLabels:
    """Soft targets of the labeled pool: row ``j`` belongs to pool index ``indices[j]``.

    ``sha256`` is the sha256 of the file's canonical JSON payload, which holds the sha256 of the array.
    """

    indices: np.ndarray
    targets: np.ndarray
    sha256: str
    path: Path | None


def soft_label_filename(split: Split, noise: str, epsilon: float, seed: int) -> str:
    """``<split file stem>_soft_<noise>_eps<ε>_seed<seed>`` (without suffix): one file per draw."""
    if split.path is None:
        raise ValueError("soft labels are stored next to their split file; this split was never saved")
    return f"{split.path.stem}_soft_{noise}_eps{float(epsilon)!r}_seed{seed}"


def _soft_label_identity(
    dataset: str, split: Split, num_classes: int, noise: str, epsilon: float, seed: int
) -> dict[str, Any]:
    """What a soft-label file must record to be reused for this request (everything but the array)."""
    return {
        "format": SOFT_LABEL_FORMAT,
        "dataset": dataset,
        "split_sha256": split.sha256,
        "num_classes": num_classes,
        "noise": noise,
        "epsilon": float(epsilon),
        "seed": seed,
        "shape": [len(split.labeled_indices), num_classes],
        "dtype": "float32",
    }


def _load_soft_labels(json_path: Path, array_path: Path, expected: dict[str, Any], split: Split) -> SoftLabels:
    hint = f"delete {json_path} and {array_path} to draw them again"
    try:
        payload = json.loads(json_path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SplitFileError(f"soft-label file {json_path} is unreadable or corrupted ({err}); {hint}") from err
    if not isinstance(payload, dict) or "sha256" not in payload:
        raise SplitFileError(f"soft-label file {json_path} has no sha256 field; {hint}")
    if payload_sha256(payload) != payload["sha256"]:
        raise SplitFileError(f"soft-label file {json_path} fails its sha256 check: it was edited or corrupted; {hint}")
    mismatched = sorted(k for k, v in expected.items() if payload.get(k) != v)
    if mismatched:
        raise SplitFileError(
            f"soft-label file {json_path} was drawn for "
            f"{ {k: payload.get(k) for k in mismatched} }, not for { {k: expected[k] for k in mismatched} }; {hint}"
        )
    try:
        targets = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SplitFileError(f"soft-label array {array_path} is missing or unreadable ({err}); {hint}") from err
    if targets.dtype != np.float32 or list(targets.shape) != expected["shape"]:
        raise SplitFileError(
            f"soft-label array {array_path} is {targets.dtype} {targets.shape}, the file records "
            f"float32 {tuple(expected['shape'])}; {hint}"
        )
    if array_sha256(targets) != payload.get("array_sha256"):
        raise SplitFileError(f"soft-label array {array_path} fails its sha256 check: it was edited or corrupted; {hint}")
    return SoftLabels(split.labeled_indices, targets, payload["sha256"], json_path)


def load_or_create_soft_labels(
    split: Split, num_classes: int, noise: SoftLabelNoise, epsilon: float, seed: int, directory: Path, dataset: str
) -> SoftLabels:
    """Reuse ``<name>.json`` + ``<name>.npy`` in ``directory`` after verifying both, else draw and write them.

    The labels ``c_i`` are the split's training labels (noisy under symmetric label noise). The JSON,
    written last, holds the draw's parameters, the split's sha256 and the array's sha256; an edited,
    truncated or mismatched file raises :class:`~ssl_lightning.data.splits.SplitFileError`.
    """
    name = soft_label_filename(split, noise, epsilon, seed)
    json_path, array_path = Path(directory) / f"{name}.json", Path(directory) / f"{name}.npy"
    identity = _soft_label_identity(dataset, split, num_classes, noise, epsilon, seed)
    if json_path.exists():
        return _load_soft_labels(json_path, array_path, identity, split)
    targets = draw_soft_labels(split.labeled_targets, num_classes, noise, epsilon, seed)
    payload = {**identity, "array_sha256": array_sha256(targets)}
    payload["sha256"] = payload_sha256(payload)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(array_path, npy_bytes(targets))
    write_bytes_atomic(json_path, (canonical_json(payload) + "\n").encode("ascii"))
    return SoftLabels(split.labeled_indices, targets, payload["sha256"], json_path)


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
        affine_degrees, affine_translate, affine_scale: ranges of the ``affine`` view (rotation ±degrees,
            shift ± fraction of the side, zoom (min, max)).
        num_workers: DataLoader workers per rank.
        seed: stream and augmentation seed; ``None`` follows ``seed_everything``.
        normalization: ``dataset`` (this dataset's mean and std) or ``imagenet`` (the statistics that
            ImageNet-pretrained weights expect).
        soft_label_noise: ``none``, or soft targets for the labeled pool (see :func:`draw_soft_labels`),
            read by methods with a soft-target loss through :meth:`soft_targets`.
        soft_label_epsilon: the noise weight ε in [0, 1].
        soft_label_seed: seed of the Dirichlet draw, independent of the run and split seeds.
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
        affine_degrees: float = 15.0,
        affine_translate: float = 0.1,
        affine_scale: tuple[float, float] = (0.9, 1.1),
        num_workers: int = 2,
        seed: int | None = None,
        normalization: Literal["dataset", "imagenet"] = "dataset",
        soft_label_noise: SoftLabelNoise = "none",
        soft_label_epsilon: float = 0.0,
        soft_label_seed: int = 0,
    ) -> None:
        super().__init__()
        if soft_label_noise not in SOFT_LABEL_NOISES:
            raise ValueError(f"soft_label_noise must be one of {SOFT_LABEL_NOISES}, got {soft_label_noise!r}")
        if not 0.0 <= soft_label_epsilon <= 1.0:
            raise ValueError(f"soft_label_epsilon must be in [0, 1], got {soft_label_epsilon}")
        if soft_label_noise == "none" and soft_label_epsilon != 0.0:
            raise ValueError(
                f"soft_label_epsilon={soft_label_epsilon} has no effect without soft labels: "
                "set --data.soft_label_noise=dirichlet or uniform"
            )
        if soft_label_seed < 0:
            raise ValueError(f"soft_label_seed must be >= 0 (numpy seeds are non-negative), got {soft_label_seed}")
        self.soft_label_noise = soft_label_noise
        self.soft_label_epsilon = float(soft_label_epsilon)
        self.soft_label_seed = int(soft_label_seed)
        self.soft_labels: SoftLabels | None = None
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
            affine_degrees=affine_degrees,
            affine_translate=affine_translate,
            affine_scale=tuple(float(v) for v in affine_scale),  # a YAML list becomes a tuple
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
        if self.has_soft_labels:
            self.soft_labels = load_or_create_soft_labels(
                self.split, self.num_classes, self.soft_label_noise, self.soft_label_epsilon, self.soft_label_seed,
                directory=self.data_dir / "splits", dataset=self.dataset_key,
            )

    def labeled_subset(self) -> tuple[np.ndarray, np.ndarray]:
        """Pool indices of the labeled examples (what ``StreamBatch.indices`` holds) and the labels the
        model trains on (noisy under label noise), for methods that keep per-example state."""
        self.setup()
        assert self.split is not None
        return self.split.labeled_indices, self.split.labeled_targets

    # ----- soft labels -----------------------------------------------------------------------------------
    @property
    def has_soft_labels(self) -> bool:
        """Whether the labeled pool carries soft targets (``soft_label_noise`` is not ``none``)."""
        return self.soft_label_noise != "none"

    def _checked_soft_labels(self) -> SoftLabels:
        if not self.has_soft_labels:
            raise RuntimeError(
                f"{type(self).__name__} has no soft labels: set --data.soft_label_noise=dirichlet or uniform "
                "(and --data.soft_label_epsilon)"
            )
        self.setup()
        assert self.soft_labels is not None
        return self.soft_labels

    def soft_targets(self) -> torch.Tensor:
        """Soft targets as a float32 ``(N_pool, K)`` tensor indexed by pool index (what
        ``StreamBatch.indices`` holds); rows of images outside the labeled pool are zero."""
        soft = self._checked_soft_labels()
        assert self.sources is not None
        table = torch.zeros(len(self.sources.train), self.num_classes, dtype=torch.float32)
        table[torch.from_numpy(soft.indices)] = torch.from_numpy(soft.targets)
        return table

    @property
    def soft_labels_sha256(self) -> str | None:
        """sha256 of the soft-label file in use (``results.json``), ``None`` without soft labels."""
        return self._checked_soft_labels().sha256 if self.has_soft_labels else None

    @property
    def soft_label_argmax_accuracy(self) -> float | None:
        """Fraction of labeled images whose soft target's argmax is the true (clean) class."""
        if not self.has_soft_labels:
            return None
        soft = self._checked_soft_labels()
        assert self.split is not None
        if len(soft.targets) == 0:
            return float("nan")
        return float(np.mean(soft.targets.argmax(axis=1) == self.split.clean_labeled_targets))

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

