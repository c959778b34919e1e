"""Image sources: the one interface between on-disk dataset formats and the DataModules.

A source is an indexable collection of ``uint8`` images in ``(C, H, W)`` layout with integer targets.
Readers of the official formats (``formats.py``) return sources; DataModules wrap them with views and
samplers. Targets are ``-1`` for images that carry no label (STL-10 ``unlabeled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF


class ImageSource:
    """Abstract image source: ``len``, ``targets`` and ``load(i) -> uint8 (C, H, W)``."""

    targets: np.ndarray
    num_channels: int

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images held in a ``(N, C, H, W)`` uint8 array (a NumPy memmap works too, and stays lazy)."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: Sequence[int] | np.ndarray) -> None:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        if isinstance(images, torch.Tensor):
            images = images.numpy()
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_channels = int(images.shape[1])

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index]))


class FeatureSource(ImageSource):
    """Float vectors or maps held in memory (cached network features, synthetic data) instead of images.

    The DataModule passes floating-point inputs through unnormalised, and only the identity view applies.
    """

    def __init__(self, features: np.ndarray | torch.Tensor, targets: Sequence[int] | np.ndarray) -> None:
        features = torch.as_tensor(features)
        if not features.is_floating_point():
            raise ValueError(f"expected floating-point features, got {features.dtype}")
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows but {len(targets)} targets")
        self.features = features.float().contiguous()
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_channels = int(features.shape[1]) if features.ndim > 1 else 1

    def load(self, index: int) -> torch.Tensor:
        return self.features[index]


class FileSource(ImageSource):
    """Encoded image files (JPEG/PNG) decoded on access, optionally resized to ``resize`` (H, W)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int] | np.ndarray,
        resize: tuple[int, int] | None = None,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        self.resize = resize
        self.num_channels = 3

    def load(self, index: int) -> torch.Tensor:
        image = decode_image(read_file(self.paths[index]), mode=ImageReadMode.RGB)
        if self.resize is not None:
            image = TF.resize(image, list(self.resize), antialias=True)
        return image


class ConcatSource(ImageSource):
    """Several sources back to back (SVHN train + extra, STL-10 train + unlabeled)."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        channels = {s.num_channels for s in sources}
        if len(channels) != 1:
            raise ValueError(f"sources disagree on channel count: {channels}")
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.targets = np.concatenate([s.targets for s in sources])
        self.num_channels = channels.pop()

    def load(self, index: int) -> torch.Tensor:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.sources[part].load(index - int(self.offsets[part]))


class SubsetSource(ImageSource):
    """The images of ``source`` at ``indices`` (a validation split carved from a training pool)."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = source.targets[self.indices]
        self.num_channels = source.num_channels

    def load(self, index: int) -> torch.Tensor:
        return self.source.load(int(self.indices[index]))
