"""Readers for the official on-disk formats of the supported datasets.

Each reader parses the files exactly as the dataset authors distribute them (and as torchvision lays them
out after downloading) and returns an :class:`~ssl_lightning.data.sources.ImageSource`. We parse the formats
ourselves instead of instantiating torchvision's dataset classes because those verify MD5 sums of whole
files, which rules out the small synthetic fixtures the test-suite writes in the same formats. torchvision is
used only to *fetch* missing files (``download=True``), since it knows the mirrors and checksums.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_lightning.data.sources import ArraySource, FileSource

__all__ = [
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "IMAGE_EXTENSIONS",
    "read_cifar10",
    "read_cifar100",
    "read_idx",
    "read_image_folder",
    "read_mnist",
    "read_stl10",
    "read_svhn",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")

_DOWNLOAD_HINT = "Put the official files there or pass --data.download=true to fetch them."


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where its reader expects them."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but its content does not match the official format."""


def _missing_error(dataset: str, path: Path, extra: str = "") -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{dataset} not found: expected {path}.{extra} {_DOWNLOAD_HINT}")


def _root(root: str | Path) -> Path:
    # Absolute so that error messages name a path the user can check regardless of the working directory.
    return Path(root).expanduser().absolute()


def _ensure_files(
    dataset: str,
    expected: Sequence[Path],
    download: bool,
    fetch: Callable[[], None],
    exists: Callable[[Path], bool] = Path.is_file,
    extra: str = "",
) -> None:
    """Raise unless every expected file exists, fetching them first when ``download`` allows it."""

    def first_missing() -> Path | None:
        return next((p for p in expected if not exists(p)), None)

    missing = first_missing()
    if missing is None:
        return
    if not download:
        raise _missing_error(dataset, missing, extra)
    fetch()
    missing = first_missing()
    if missing is not None:
        raise DatasetNotFoundError(
            f"{dataset} not found: expected {missing} even after downloading into {expected[0].parent}."
        )


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"unknown {dataset} split {split!r}; expected one of {list(allowed)}")


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDatasetError(
            f"{path}: labels span [{labels.min()}, {labels.max()}], expected values in [0, {num_classes - 1}]"
        )


# --------------------------------------------------------------------------------------------------- MNIST

# IDX type codes (third byte of the magic number) and the big-endian NumPy dtypes they denote.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): 2 zero bytes, type code, rank, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # a truncated .gz surfaces here
        raise CorruptDatasetError(f"{path}: cannot read IDX file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: IDX header truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise CorruptDatasetError(
            f"{path}: IDX dims {dims} need {expected} data bytes, file holds {len(data) - header}"
        )
    # Copy out of the immutable bytes buffer (and into native byte order) so tensors built on it are writable.
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .astype(dtype.newbyteorder("="), copy=True)
        .reshape(dims)
    )


def _idx_path(raw: Path, name: str) -> Path:
    # torchvision keeps both the archive and its extraction; accept either, preferring the cheaper plain file.
    plain = raw / name
    gz = raw / f"{name}.gz"
    return gz if not plain.is_file() and gz.is_file() else plain


def read_mnist(root: str | Path, train: bool, download: bool = False) -> ArraySource:
    """MNIST from ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` as (N, 1, 28, 28)."""
    raw = _root(root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")

    def fetch() -> None:
        from torchvision import datasets

        datasets.MNIST(str(_root(root)), train=False, download=True)

    _ensure_files(
        "MNIST",
        [raw / n for n in names],
        download,
        fetch,
        exists=lambda p: p.is_file() or p.with_name(p.name + ".gz").is_file(),
        extra=" (the gzip-compressed .gz file is accepted too)",
    )
    image_path, label_path = (_idx_path(raw, n) for n in names)
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDatasetError(
            f"{image_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise CorruptDatasetError(
            f"{label_path}: {labels.shape} labels for {len(images)} images in {image_path}"
        )
    _check_labels(labels, 10, label_path)
    return ArraySource(images[:, None], labels.astype(np.int64))


# --------------------------------------------------------------------------------------------------- CIFAR


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR batch: a Python 2 pickle whose keys we normalise to ``str``."""
    try:
        with open(path, "rb") as f:
            # latin1 is the only codec that round-trips the Python 2 byte strings holding the pixel array.
            batch = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise CorruptDatasetError(
            f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    # Pickles re-saved from Python 3 with bytes keys still load with bytes keys under latin1.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_arrays(path: Path, label_keys: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    batch = _load_cifar_pickle(path)
    missing = [k for k in ("data", *label_keys) if k not in batch]
    if missing:
        raise CorruptDatasetError(f"{path}: missing keys {missing}; found {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    labels = [np.asarray(batch[k], dtype=np.int64) for k in label_keys]
    for key, lab in zip(label_keys, labels, strict=True):
        if lab.shape != (len(data),):
            raise CorruptDatasetError(f"{path}: {key!r} has shape {lab.shape} for {len(data)} images")
    return data, labels


def _cifar_images(rows: Sequence[np.ndarray]) -> np.ndarray:
    # Each row is the R plane then G then B, each 32x32 row-major, so a plain reshape yields (C, H, W).
    return np.concatenate(rows).reshape(-1, 3, 32, 32)


def read_cifar10(root: str | Path, train: bool, download: bool = False) -> ArraySource:
    """CIFAR-10 from ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` as (N, 3, 32, 32)."""
    folder = _root(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]

    def fetch() -> None:
        from torchvision import datasets

        datasets.CIFAR10(str(_root(root)), train=False, download=True)

    _ensure_files("CIFAR-10", [folder / n for n in names], download, fetch)
    parts = [_cifar_arrays(folder / n, ["labels"]) for n in names]
    labels = np.concatenate([lab[0] for _, lab in parts])
    _check_labels(labels, 10, folder / names[0])
    return ArraySource(_cifar_images([data for data, _ in parts]), labels)


def read_cifar100(root: str | Path, train: bool, download: bool = False, coarse: bool = False) -> ArraySource:
    """CIFAR-100 from ``root/cifar-100-python/{train,test}``; ``coarse`` selects the 20 superclass labels."""
    path = _root(root) / "cifar-100-python" / ("train" if train else "test")

    def fetch() -> None:
        from torchvision import datasets

        datasets.CIFAR100(str(_root(root)), train=False, download=True)

    _ensure_files("CIFAR-100", [path], download, fetch)
    key = "coarse_labels" if coarse else "fine_labels"
    data, (labels,) = _cifar_arrays(path, [key])
    _check_labels(labels, 20 if coarse else 100, path)
    return ArraySource(_cifar_images([data]), labels)


# ---------------------------------------------------------------------------------------------------- SVHN

SVHN_SPLITS: tuple[str, ...] = ("train", "test", "extra")


def read_svhn(root: str | Path, split: str, download: bool = False) -> ArraySource:
    """SVHN cropped digits from ``root/{split}_32x32.mat`` as (N, 3, 32, 32); label 10 (digit 0) becomes 0."""
    _check_split(split, SVHN_SPLITS, "SVHN")
    path = _root(root) / f"{split}_32x32.mat"

    def fetch() -> None:
        from torchvision import datasets

        datasets.SVHN(str(_root(root)), split=split, download=True)

    _ensure_files("SVHN", [path], download, fetch)
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except Exception as err:  # scipy raises a zoo of types (ValueError, TypeError, OSError...) for bad files
        raise CorruptDatasetError(
            f"{path}: not a readable MATLAB file ({type(err).__name__}: {err})"
        ) from err
    if "X" not in mat or "y" not in mat:
        raise CorruptDatasetError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise CorruptDatasetError(
            f"{path}: expected uint8 X of shape (32, 32, 3, N), got {x.dtype} {x.shape}"
        )
    labels = np.asarray(y).reshape(-1)
    if len(labels) != x.shape[3]:
        raise CorruptDatasetError(f"{path}: y holds {len(labels)} labels for {x.shape[3]} images")
    labels = labels.astype(np.int64)
    _check_labels(labels - 1, 10, path)  # official labels are 1..10
    labels[labels == 10] = 0
    # MATLAB stores X as (H, W, C, N); one contiguous copy now beats a strided gather on every access.
    return ArraySource(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels)


# -------------------------------------------------------------------------------------------------- STL-10

STL10_SPLITS: tuple[str, ...] = ("train", "test", "unlabeled")
_STL_SHAPE = (3, 96, 96)
_STL_BYTES = 3 * 96 * 96


class STL10Images(ArraySource):
    """STL-10 images memory-mapped from a ``*_X.bin`` file and transposed lazily, one image per ``load``.

    The unlabeled split is 2.7 GB; mapping it keeps start-up instant and memory flat. The map itself is not
    pickled (DataLoader workers under ``spawn``, DDP) but reopened on first access in the receiving process.
    """

    def __init__(self, path: str | Path, targets: np.ndarray) -> None:
        # ArraySource.__init__ is skipped on purpose: it would need the array, which is opened on demand.
        self.path = Path(path)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_channels = _STL_SHAPE[0]
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:  # type: ignore[override]
        if self._images is None:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r")
            # Files store each channel column-major (MATLAB heritage): swap W and H back, still as a view.
            self._images = raw.reshape(-1, *_STL_SHAPE).transpose(0, 1, 3, 2)
        return self._images

    def load(self, index: int) -> torch.Tensor:
        # ascontiguousarray copies the strided view, so the tensor is writable and detached from the map.
        return torch.from_numpy(np.ascontiguousarray(self.images[index]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state


def read_stl10(root: str | Path, split: str, download: bool = False) -> ArraySource:
    """STL-10 from ``root/stl10_binary/{split}_X.bin`` (+ ``{split}_y.bin``) as (N, 3, 96, 96).

    Labels 1..10 become 0..9; the ``unlabeled`` split has targets -1. Images are memory-mapped.
    """
    _check_split(split, STL10_SPLITS, "STL-10")
    folder = _root(root) / "stl10_binary"
    x_path = folder / f"{split}_X.bin"
    y_path = folder / f"{split}_y.bin"
    expected = [x_path] if split == "unlabeled" else [x_path, y_path]

    def fetch() -> None:
        from torchvision import datasets

        # The archive holds every split; "test" is the cheapest one for torchvision to load afterwards.
        datasets.STL10(str(_root(root)), split="test", download=True)

    _ensure_files("STL-10", expected, download, fetch)
    size = x_path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise CorruptDatasetError(
            f"{x_path}: {size} bytes is not a positive multiple of {_STL_BYTES} (one 3x96x96 image)"
        )
    count = size // _STL_BYTES
    if split == "unlabeled":
        targets = np.full(count, -1, dtype=np.int64)
    else:
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if len(labels) != count:
            raise CorruptDatasetError(f"{y_path}: {len(labels)} labels for {count} images in {x_path}")
        _check_labels(labels - 1, 10, y_path)
        targets = labels - 1
    return STL10Images(x_path, targets)


# ------------------------------------------------------------------------------------------ ImageNet layout


def _list_images(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # os.walk visits in the order left in dirnames; sorting makes listings reproducible
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


_IMAGEFOLDER_HELP = (
    "Expected the ImageFolder layout <root>/train/<class>/<image> and <root>/val/<class>/<image> "
    "(class folders such as n01440764, identical in train/ and val/; sort the flat ILSVRC2012 validation "
    "images into class folders first). ImageNet cannot be downloaded automatically: obtain it from "
    "https://image-net.org and extract it there."
)


def read_image_folder(
    root: str | Path,
    split: str,
    download: bool = False,
    resize: tuple[int, int] | None = None,
) -> FileSource:
    """Images under ``root/{split}/<class>/`` (ImageNet layout), decoded on access to RGB.

    Class indices follow the sorted folder names of ``root/train`` whenever it exists, so train and val
    agree even when val lacks some classes. ``download`` only changes the message: ImageNet has no mirror.
    """
    _check_split(split, ("train", "val"), "ImageNet")
    base = _root(root)
    folder = base / split
    if not folder.is_dir():
        reason = " download=True cannot help: " if download else " "
        raise DatasetNotFoundError(
            f"ImageNet not found: expected the directory {folder}.{reason}{_IMAGEFOLDER_HELP}"
        )
    reference = base / "train" if (base / "train").is_dir() else folder
    classes = _class_dirs(reference)
    if not classes:
        raise DatasetNotFoundError(
            f"ImageNet not found: {reference} has no class folders. {_IMAGEFOLDER_HELP}"
        )
    index = {name: i for i, name in enumerate(classes)}
    present = _class_dirs(folder)
    unknown = [c for c in present if c not in index]
    if unknown:
        raise CorruptDatasetError(
            f"{folder}: class folders {unknown[:5]} do not exist in {reference}; train and val must share classes"
        )
    paths: list[Path] = []
    targets: list[int] = []
    for name in present:
        files = _list_images(folder / name)
        paths.extend(files)
        targets.extend([index[name]] * len(files))
    if not paths:
        raise DatasetNotFoundError(
            f"ImageNet not found: no {'/'.join(IMAGE_EXTENSIONS)} images under {folder}/<class>/. {_IMAGEFOLDER_HELP}"
        )
    return FileSource(paths, targets, resize=resize)
