"""Fixed-feature protocol (collision-CE spec §5.1, pitfall P8): a frozen pretrained backbone's pooled
features of every image, computed once, cached on disk and served as the dataset.

Each split's features are computed in eval mode, in float32 (no autocast, no TF32), without
augmentation: uint8 images ÷ 255, grey repeated to 3 channels, a bilinear resize to
``feature_image_size``, ImageNet mean/std, then ``build_backbone(name, num_classes=0)`` (pooled
features). They are written to ``<cache_dir>/<key>.npy`` with a meta file ``<key>.json`` (weights
sha256, preprocessing, torchvision version, dataset, split, backbone, image count and a sha256 of the
targets, plus the array's sha256), both atomically, JSON last. ``<key>`` embeds a hash of all those
fields, so changing any of them (another weights file, another resize) computes a new cache instead of
reusing a stale one; a cache whose JSON or array does not verify is computed again.

The training pool and test set are then :class:`~ssl_lightning.data.sources.FeatureSource` s of
float32 ``(N, D)`` rows: ``in_channels = D`` and ``image_size = 1``, so a linear ``mlp`` head sees
``in_channels · image_size² = D`` inputs, and every view is the identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from filelock import FileLock
from torch import Tensor, nn

from ssl_lightning.data.datasets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    MNISTDataModule,
    STL10DataModule,
)
from ssl_lightning.data.digits import DigitsDataModule
from ssl_lightning.data.module import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Sources,
    SSLDataModule,
    array_sha256,
    npy_bytes,
)
from ssl_lightning.data.sources import ArraySource, FeatureSource, ImageSource
from ssl_lightning.data.splits import canonical_json, write_bytes_atomic
from ssl_lightning.data.views import IdentityView
from ssl_lightning.nets import build_backbone
from ssl_lightning.nets.pretrained import PretrainedWeightsError, sha256_of_file

log = logging.getLogger(__name__)

__all__ = [
    "FEATURE_DATASETS",
    "FixedFeatureDataModule",
    "extract_features",
    "preprocess_images",
]

FeatureDataset = Literal["mnist", "cifar10", "cifar100_20", "stl10", "digits"]

#: The image DataModule (and its arguments) whose ``build_sources()`` gives each dataset's images.
#: STL-10 keeps its 5k labeled train images only: the unlabeled split never enters this protocol.
FEATURE_DATASETS: dict[str, tuple[type[SSLDataModule], dict[str, Any]]] = {
    "mnist": (MNISTDataModule, {}),
    "cifar10": (CIFAR10DataModule, {}),
    "cifar100_20": (CIFAR100DataModule, {"superclasses": True}),
    "stl10": (STL10DataModule, {"use_unlabeled_split": False}),
    "digits": (DigitsDataModule, {}),
}

CACHE_FORMAT = 1
#: The weights identity recorded for ``feature_random_init`` (a seeded random init, for smoke tests).
RANDOM_INIT_SEED = 0
RANDOM_INIT_ID = f"random-init-seed{RANDOM_INIT_SEED}"


def preprocessing_record(image_size: int) -> dict[str, Any]:
    """The preprocessing as recorded in (and matched against) the cache meta file."""
    return {
        "scale": "uint8/255",
        "grey": "repeat to 3 channels",
        "resize": {"size": image_size, "mode": "bilinear", "align_corners": False, "antialias": True},
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "model_mode": "eval",
        "dtype": "float32",
        "augmentation": None,
    }


def preprocess_images(images: Tensor, image_size: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` → float32 ``(N, 3, S, S)`` normalised with ImageNet's statistics.

    The resize runs on the float image, so it is not quantised back to uint8 as a PIL pipeline would;
    antialiasing only acts when shrinking (never here: every dataset is upsampled to 224 px).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, C, H, W) images with C in {{1, 3}}, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _image_batches(source: ImageSource, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(source), batch_size):
        stop = min(start + batch_size, len(source))
        if isinstance(source, ArraySource):
            # One slice of the (possibly memory-mapped) array instead of a load per image.
            yield torch.from_numpy(np.ascontiguousarray(source.images[start:stop]))
        else:
            yield torch.stack([source.load(i) for i in range(start, stop)])


@contextmanager
def _strict_float32() -> Iterator[None]:
    """No TF32 in convolutions or matmuls (cuDNN allows it by default): features are true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def extract_features(
    model: nn.Module, source: ImageSource, image_size: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Pooled features float32 ``(N, D)`` of every image of ``source``, in order (see the module docstring)."""
    model = model.to(device).eval()
    chunks: list[np.ndarray] = []
    with torch.inference_mode(), torch.autocast(device.type, enabled=False), _strict_float32():
        for images in _image_batches(source, batch_size):
            features = model(preprocess_images(images.to(device, non_blocking=True), image_size))
            if features.ndim != 2:
                raise ValueError(f"the feature backbone returned shape {tuple(features.shape)}, expected (N, D)")
            chunks.append(features.float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


class FixedFeatureDataModule(SSLDataModule):
    """Cached pooled features of a frozen pretrained backbone as the dataset (spec §5.1).

    Args:
        dataset: the image dataset, built by the DataModule of :data:`FEATURE_DATASETS` on ``data_dir``.
        feature_backbone: a registered backbone name; ``build_backbone(name, num_classes=0)`` gives pooled
            features (``resnet50``: 2048-d).
        feature_weights: local weights file in the backbone's (torchvision) format, e.g. torchvision's
            ``IMAGENET1K_V1`` ResNet-50 file ``resnet50-0676ba61.pth``. Never downloaded; required unless
            ``feature_random_init``.
        feature_random_init: use a seeded random init instead of weights (smoke tests only).
        feature_backbone_args: extra keyword arguments of the backbone constructor.
        feature_image_size: side of the resized images fed to the backbone.
        cache_dir: where ``<key>.npy`` and ``<key>.json`` are kept (relative to the working directory).
        feature_batch_size: images per forward pass during extraction.
        feature_device: device of the extraction; ``None``: the trainer's GPU if it runs on one, else the
            CPU (without a trainer: a GPU when one is visible).
        data_dir, download, num_workers, **kwargs: as for :class:`~ssl_lightning.data.module.SSLDataModule`
            (labels, batch sizes, views, seeds). Views are always the identity on feature vectors.
    """

    image_size = 1
    default_hflip = False

    def __init__(
        self,
        dataset: FeatureDataset = "cifar10",
        feature_backbone: str = "resnet50",
        feature_weights: str | None = None,
        feature_random_init: bool = False,
        feature_backbone_args: dict[str, Any] | None = None,
        feature_image_size: int = 224,
        cache_dir: str = "cache/features",
        feature_batch_size: int = 256,
        feature_device: str | None = None,
        data_dir: str = "data",
        download: bool = False,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if dataset not in FEATURE_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(FEATURE_DATASETS)}")
        if feature_image_size <= 0 or feature_batch_size <= 0:
            raise ValueError("feature_image_size and feature_batch_size must be positive")
        if feature_weights is None and not feature_random_init:
            raise ValueError(
                f"FixedFeatureDataModule needs pretrained weights for its {feature_backbone!r} feature backbone: "
                f"pass --data.feature_weights=<local {feature_backbone} state dict in torchvision's format> (the "
                "spec's features come from torchvision's ResNet-50 IMAGENET1K_V1 weights, resnet50-0676ba61.pth; "
                "nothing is downloaded), or --data.feature_random_init=true for a smoke test with random weights"
            )
        if feature_weights is not None and feature_random_init:
            raise ValueError("feature_weights and feature_random_init=true contradict each other; set only one")
        if feature_weights is not None:
            self._check_weights_file(feature_weights)
        cls, extra = FEATURE_DATASETS[dataset]
        self.image_datamodule = cls(data_dir=data_dir, download=download, **extra)
        self.dataset = dataset
        self.name = dataset
        self.num_classes = self.image_datamodule.num_classes
        self.feature_backbone = feature_backbone
        self.feature_weights = feature_weights
        self.feature_random_init = feature_random_init
        self.feature_backbone_args = dict(feature_backbone_args or {})
        self.feature_image_size = feature_image_size
        self.cache_dir = Path(cache_dir)
        self.feature_batch_size = feature_batch_size
        self.feature_device = feature_device
        # The feature size is needed before setup (the CLI links it to the model): build on the meta
        # device, which allocates nothing and skips the initialisers' work.
        with torch.device("meta"):
            self.in_channels = self._build_model(load_weights=False).num_features
        self.feature_cache_sha256: str | None = None
        self._features: dict[str, np.ndarray] = {}
        self._warned_views = False
        super().__init__(data_dir=data_dir, download=download, num_workers=num_workers, **kwargs)

    # ----- identity of the cache ---------------------------------------------------------------------
    @property
    def dataset_key(self) -> str:
        # The same training pool as the image DataModule, so both share split files.
        return self.image_datamodule.dataset_key

    @staticmethod
    def _check_weights_file(path: str) -> Path:
        weights = Path(path).expanduser()
        if not weights.is_file():
            raise PretrainedWeightsError(
                f"feature weights file not found: {weights}. Weights load from a local file only: put the "
                "file there or point --data.feature_weights at it"
            )
        return weights

    def _weights_id(self) -> str:
        if self.feature_weights is None:
            return RANDOM_INIT_ID
        return sha256_of_file(self._check_weights_file(self.feature_weights))

    def _identity(self, split: str, source: ImageSource, weights_id: str) -> dict[str, Any]:
        """Every field a cached split must match to be reused."""
        return {
            "format": CACHE_FORMAT,
            "dataset": self.dataset,
            "split": split,
            "num_images": len(source),
            "targets_sha256": array_sha256(np.asarray(source.targets, dtype=np.int64)),
            "feature_backbone": self.feature_backbone,
            "feature_backbone_args": self.feature_backbone_args,
            "weights_sha256": weights_id,
            "preprocessing": preprocessing_record(self.feature_image_size),
            "torchvision_version": torchvision.__version__,
        }

    def cache_key(self, split: str, source: ImageSource, weights_id: str) -> str:
        """``<dataset>_<split>_<backbone>_<size>px_<hash of the identity>``."""
        identity = self._identity(split, source, weights_id)
        digest = hashlib.sha256(canonical_json(identity).encode("ascii")).hexdigest()[:16]
        return f"{self.dataset}_{split}_{self.feature_backbone}_{self.feature_image_size}px_{digest}"

    # ----- extraction --------------------------------------------------------------------------------
    def _build_model(self, load_weights: bool) -> nn.Module:
        kwargs = dict(num_classes=0, in_channels=3, image_size=self.feature_image_size, **self.feature_backbone_args)
        if not load_weights:
            return build_backbone(self.feature_backbone, **kwargs)
        if self.feature_weights is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                return build_backbone(self.feature_backbone, **kwargs)
        return build_backbone(self.feature_backbone, pretrained_path=self.feature_weights, **kwargs)

    def _extraction_device(self) -> torch.device:
        if self.feature_device is not None:
            return torch.device(self.feature_device)
        trainer = self.trainer
        if trainer is not None:
            root = trainer.strategy.root_device
            return root if root.type == "cuda" else torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load_cached(self, array_path: Path, meta_path: Path, identity: dict[str, Any]) -> np.ndarray | None:
        """The cached features, or None (with a warning) when the files do not verify."""
        try:
            meta = json.loads(meta_path.read_text(encoding="ascii"))
            mismatched = sorted(k for k, v in identity.items() if meta.get(k) != v)
            if mismatched:
                raise ValueError(f"meta fields differ: {mismatched}")
            features = np.load(array_path, allow_pickle=False)
            if features.dtype != np.float32 or features.shape != tuple(meta["shape"]):
                raise ValueError(f"array is {features.dtype} {features.shape}, meta says float32 {meta['shape']}")
            if array_sha256(features) != meta["array_sha256"]:
                raise ValueError("array fails its sha256 check")
        except (OSError, KeyError, TypeError, ValueError) as err:
            warnings.warn(f"feature cache {meta_path} is unusable ({err}); computing it again", stacklevel=2)
            return None
        return features

    def _split_features(self, split: str, source: ImageSource, weights_id: str) -> np.ndarray:
        """Cached features of one split, computed (once across processes) when missing or unusable."""
        key = self.cache_key(split, source, weights_id)
        identity = self._identity(split, source, weights_id)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"
        # Ranks (or runs) sharing the cache wait for the one that computes it instead of repeating it.
        with FileLock(str(self.cache_dir / f"{key}.lock")):
            if meta_path.exists():
                cached = self._load_cached(array_path, meta_path, identity)
                if cached is not None:
                    log.info("loaded %s features from %s", split, array_path)
                    return cached
            device = self._extraction_device()
            start = time.perf_counter()
            model = self._build_model(load_weights=True)
            features = extract_features(model, source, self.feature_image_size, self.feature_batch_size, device)
            seconds = time.perf_counter() - start
            meta = {
                **identity,
                "shape": list(features.shape),
                "dtype": "float32",
                "array_sha256": array_sha256(features),
                # Informational only, not matched: the same features computed elsewhere stay reusable.
                "torch_version": torch.__version__,
                "device": str(device),
                "seconds": round(seconds, 2),
            }
            write_bytes_atomic(array_path, npy_bytes(features))
            write_bytes_atomic(meta_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("ascii"))
            log.info("computed %s features %s in %.1f s on %s into %s", split, features.shape, seconds, device, array_path)
            return features

    def prepare_data(self) -> None:
        # Only the image download happens here; features are computed in setup, where the device is known.
        if self.download:
            self.image_datamodule.build_sources()

    def build_sources(self) -> Sources:
        images = self.image_datamodule.build_sources()
        weights_id = self._weights_id()
        train = self._split_features("train", images.train, weights_id)
        test = self._split_features("test", images.test, weights_id)
        if train.shape[1] != self.in_channels or test.shape[1] != self.in_channels:
            raise ValueError(
                f"features have {train.shape[1]} / {test.shape[1]} dimensions, the backbone declares {self.in_channels}"
            )
        digest = hashlib.sha256()
        digest.update(train.tobytes())
        digest.update(test.tobytes())
        self.feature_cache_sha256 = digest.hexdigest()
        self._features = {"train": train, "test": test}
        return Sources(train=FeatureSource(train, images.train.targets), test=FeatureSource(test, images.test.targets))

    # ----- what methods and baselines read -------------------------------------------------------------
    def train_features(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, D) float32, targets (N,) int64)`` of the training pool (k-means baseline).

        The arrays share memory with the DataModule's sources: do not modify them.
        """
        self.setup()
        assert self.sources is not None
        return self._features["train"], self.sources.train.targets

    def test_features(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features, targets)`` of the test split, as :meth:`train_features`."""
        self.setup()
        assert self.sources is not None
        return self._features["test"], self.sources.test.targets

    def _views(self, names: list[str] | None, stream: str) -> list[Callable[[Tensor], Tensor]]:
        if not names:
            return super()._views(names, stream)  # raises with the usual message
        augmented = [name for name in names if name not in ("identity", "test")]
        if augmented and not self._warned_views:
            warnings.warn(
                f"feature vectors take no augmentation: the {stream} views {augmented} are the identity here",
                stacklevel=2,
            )
            self._warned_views = True
        return [IdentityView() for _ in names]
