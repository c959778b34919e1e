"""DataModules with fixed evaluation splits, and the weakly supervised localisation (WSOL) sets of InfoCAM.

Unlike the SSL datasets, these sets come with a fixed evaluation protocol: named evaluation splits (``val``,
``test``, ``test_full``) decided by the dataset's rules instead of a seeded label split, and, for WSOL, one
ground-truth box per evaluation image. :class:`FixedSplitDataModule` carries that protocol on top of
:class:`~ssl_lightning.data.module.SSLDataModule`, so the seeded, world-size-invariant training streams are
reused; every training image is labeled by default (``num_labels=None``) and there is no unlabeled stream
(``mu=0``). :class:`LocalizationDataModule` adds the boxes.

Conventions shared by every module here (spec ``infocam.md`` §2, §3.4, §6):

- Evaluation loaders yield ``StreamBatch(views=[x], targets, indices)`` with ``indices`` the position in
  *that* split, sharded across ranks without padding, so each image is seen exactly once.
- ``eval_boxes(stream)`` is a float32 ``(N_split, 4)`` tensor of ``[x1, y1, x2, y2]`` in the pixel frame of
  the network input (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), indexed like ``indices``.
- ``class_counts()`` counts the labels of the training split only; the PC-softmax prior comes from it.

Datasets:

- :class:`CUBDataModule` (CUB-200-2011): Resize(256, 256) is done by the source; the training view
  (``weak`` with ``crop_pad=0``) is RandomCrop 224 + HFlip, and evaluation images are centre-cropped to 224 by
  the source, so the evaluation view is the identity. GT boxes are mapped with separate x and y scales.
- :class:`CUBImbalancedDataModule`: the PC-softmax protocol (odd classes down-sampled), plus ``balanced``.
- :class:`TinyImageNetDataModule`: 64x64 images, train view flip only; GT corners are inclusive.
- :class:`DigitsLocDataModule`: scikit-learn digits pasted onto noise canvases, rendered exactly at setup.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_lightning.data.formats import CorruptDatasetError, DatasetNotFoundError
from ssl_lightning.data.module import IMAGENET_MEAN, IMAGENET_STD, Sources, SSLDataModule
from ssl_lightning.data.sources import ArraySource, FileSource, ImageSource

__all__ = [
    "CUBDataModule",
    "CUBImbalancedDataModule",
    "CUBMetadata",
    "CenterCropSource",
    "DigitsLocDataModule",
    "EvalSplit",
    "FixedSplitDataModule",
    "FixedSplits",
    "LocalizationDataModule",
    "TinyImageNetDataModule",
    "TinyMetadata",
    "alternate_halves",
    "center_crop_offset",
    "cub_boxes_to_eval_frame",
    "digits_source_split",
    "first_per_class",
    "read_cub",
    "read_tiny_imagenet",
    "render_digit_canvas",
    "render_digits_split",
    "tiny_boxes_to_eval_frame",
]

CUB_RESIZE = 256
CUB_CROP = 224
TINY_SIZE = 64
DIGITS_CANVAS = 64
DIGITS_SIDE_RANGE = (16, 40)  # inclusive: 2x to 5x the 8-pixel source


# ------------------------------------------------------------------------------------------ shared base


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split: its images, the protocol that defined it, and (WSOL) a lazy box reader.

    ``boxes`` returns ``(len(source), 4)`` boxes in the evaluation frame; it is called at most once, on
    the first :meth:`LocalizationDataModule.eval_boxes` request (CUB reads every image's size for it).
    """

    source: ImageSource
    protocol: str
    boxes: Callable[[], np.ndarray] | None = None


@dataclass(frozen=True)
class FixedSplits:
    """What a concrete fixed-split DataModule provides: the training split and its evaluation splits."""

    train: ImageSource
    evals: dict[str, EvalSplit]


def first_per_class(labels: np.ndarray, quota: Callable[[int], int]) -> np.ndarray:
    """Positions of the first ``quota(c)`` items of each class ``c``, items taken in the given order.

    ``labels`` lists the items in ascending id (or dataset index) order; the result is sorted. A class with
    fewer items than its quota keeps all of them ("capped by availability").
    """
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep[members[: max(0, quota(int(c)))]] = True
    return np.flatnonzero(keep)


def alternate_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(odd, even)``: per class, the items at odd and at even 0-based positions within the class.

    ``labels`` lists the items in ascending id order. This is the ``ref_half`` rule of CUB (and the one
    we model Tiny-ImageNet's on): odd positions form the evaluation half, even positions the val half.
    """
    labels = np.asarray(labels, dtype=np.int64)
    odd = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        odd[np.flatnonzero(labels == c)[1::2]] = True
    return np.flatnonzero(odd), np.flatnonzero(~odd)


class FixedSplitDataModule(SSLDataModule):
    """Base of DataModules whose evaluation splits are fixed by the dataset's protocol.

    A subclass implements :meth:`build_splits` and :meth:`_stream_names` (the latter from its configuration
    alone, so ``eval_streams`` is known before any file is read). Defaults differ from the SSL base: every
    training image is labeled and there is no unlabeled stream (``mu=0``); the base's random ``val_size``
    split is refused because each dataset defines its own validation split.

    Attributes:
        minority_classes: the down-sampled classes of an imbalanced protocol, else ``None``.
    """

    minority_classes: list[int] | None = None

    def __init__(
        self,
        batch_size: int = 64,
        mu: int = 0,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, mu=mu, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, **kwargs)
        if self.split_spec.val_size:
            raise ValueError(
                f"{type(self).__name__} has a fixed validation protocol; val_size={self.split_spec.val_size} "
                "(a random carve of the training split) is not supported here"
            )
        self._splits: FixedSplits | None = None

    # ----- what a concrete dataset provides -------------------------------------------------------
    def build_splits(self) -> FixedSplits:
        raise NotImplementedError

    def _stream_names(self) -> list[str]:
        raise NotImplementedError

    # ----- plumbing --------------------------------------------------------------------------------
    def build_sources(self) -> Sources:
        splits = self.build_splits()
        if list(splits.evals) != self.eval_streams:
            raise RuntimeError(
                f"{type(self).__name__} built evaluation splits {list(splits.evals)} but declares "
                f"eval_streams {self.eval_streams}"
            )
        self._splits = splits
        return Sources(train=splits.train, test=splits.evals["test"].source)

    @property
    def eval_streams(self) -> list[str]:
        """Names of the loaders :meth:`val_dataloader` returns, in order; ``test`` is always one of them."""
        return self._stream_names()

    def eval_split(self, stream: str) -> EvalSplit:
        """The images, protocol and (WSOL) boxes of one evaluation stream."""
        self.setup()
        assert self._splits is not None
        if stream not in self._splits.evals:
            raise KeyError(
                f"{type(self).__name__} has no evaluation stream {stream!r}; it has {self.eval_streams}"
            )
        return self._splits.evals[stream]

    def split_name(self, stream: str) -> str:
        """The protocol behind an evaluation stream (``full``, ``ref_half``, ``imbalanced``...), for logs."""
        return self.eval_split(stream).protocol

    def split_size(self, stream: str) -> int:
        """Number of images of an evaluation stream (each is evaluated exactly once)."""
        return len(self.eval_split(stream).source)

    def eval_targets(self, stream: str) -> torch.Tensor:
        """int64 labels of an evaluation stream, indexed like the loader's ``indices``."""
        return torch.as_tensor(self.eval_split(stream).source.targets, dtype=torch.int64)

    def class_counts(self) -> torch.Tensor:
        """int64 ``(K,)`` label counts of the training split (the labels the model trains on).

        Under the default protocol (every training image labeled) these are the counts of the whole
        training split; evaluation splits never enter.
        """
        self.setup()
        assert self.split is not None
        counts = np.bincount(self.split.labeled_targets, minlength=self.num_classes)
        return torch.as_tensor(counts, dtype=torch.int64)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.eval_split(name).source) for name in self.eval_streams]

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_split("test").source)


class LocalizationDataModule(FixedSplitDataModule):
    """A :class:`FixedSplitDataModule` whose evaluation splits carry one ground-truth box per image.

    Attributes:
        eval_image_size: side ``S_c`` of the (square) evaluation input; boxes live in ``[0, S_c]``.
    """

    eval_image_size: int = 224

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._box_cache: dict[str, torch.Tensor] = {}

    def eval_boxes(self, stream: str) -> torch.Tensor:
        """float32 ``(N_split, 4)`` GT boxes ``[x1, y1, x2, y2]`` in the evaluation frame, on the CPU."""
        if stream not in self._box_cache:
            split = self.eval_split(stream)
            if split.boxes is None:
                raise ValueError(f"{type(self).__name__}: the {stream!r} split has no boxes")
            boxes = torch.as_tensor(np.asarray(split.boxes(), dtype=np.float32))
            if boxes.shape != (len(split.source), 4):
                raise RuntimeError(f"{stream!r}: {tuple(boxes.shape)} boxes for {len(split.source)} images")
            self._box_cache[stream] = boxes
        return self._box_cache[stream]


# --------------------------------------------------------------------------------------------- geometry


def center_crop_offset(resize: int, crop: int) -> int:
    """The offset torchvision's CenterCrop uses: ``int(round((resize - crop) / 2))``."""
    return int(round((resize - crop) / 2.0))


def cub_boxes_to_eval_frame(
    boxes_xywh: np.ndarray, sizes_wh: np.ndarray, resize: int = CUB_RESIZE, crop: int = CUB_CROP
) -> np.ndarray:
    """CUB boxes ``(x, y, w, h)`` (original pixels) to ``[x1, y1, x2, y2]`` after Resize + CenterCrop.

    Resize((S_r, S_r)) changes the aspect ratio, so x and y scale separately: ``x' = x * S_r / W - o`` and
    ``y' = y * S_r / H - o`` with ``o = (S_r - S_c) / 2``, then clipping to ``[0, S_c]`` (crops can cut
    through objects; the image is kept). The reference's ``(S_r - 1) / W`` and ``o = 15`` (bug B10) are not
    reproduced.
    """
    offset = (resize - crop) / 2
    if offset != center_crop_offset(resize, crop):
        raise ValueError(f"resize {resize}, crop {crop}: the centre-crop offset {offset} is not whole")
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    sizes = np.asarray(sizes_wh, dtype=np.float64).reshape(-1, 2)
    sx, sy = resize / sizes[:, 0], resize / sizes[:, 1]
    x, y, w, h = boxes.T
    mapped = np.stack([x * sx, y * sy, (x + w) * sx, (y + h) * sy], axis=1) - offset
    return np.clip(mapped, 0.0, crop).astype(np.float32)


def tiny_boxes_to_eval_frame(
    numbers: np.ndarray, legacy_xywh: bool = False, size: int = TINY_SIZE
) -> np.ndarray:
    """Tiny-ImageNet ``val_annotations.txt`` numbers ``(x0, y0, x1, y1)`` to ``[x1, y1, x2, y2]``.

    The numbers are inclusive corner pixels, so the box is ``[x0, y0, x1 + 1, y1 + 1]`` (clipped to
    ``[0, size]``). ``legacy_xywh`` reproduces the authors' misreading (bug B2),
    ``[x0, y0, x0 + x1, y0 + y1]``, unclipped as in their evaluation; only to compare with their numbers.
    """
    values = np.asarray(numbers, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = values.T
    if legacy_xywh:
        return np.stack([x0, y0, x0 + x1, y0 + y1], axis=1).astype(np.float32)
    return np.clip(np.stack([x0, y0, x1 + 1, y1 + 1], axis=1), 0.0, size).astype(np.float32)


class CenterCropSource(ImageSource):
    """The images of ``source`` centre-cropped to ``size`` x ``size`` at torchvision's CenterCrop offsets."""

    def __init__(self, source: ImageSource, size: int) -> None:
        self.source = source
        self.size = size
        self.targets = source.targets
        self.num_channels = source.num_channels

    def load(self, index: int) -> torch.Tensor:
        image = self.source.load(index)
        height, width = image.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"cannot centre-crop {self.size} px from a {height}x{width} image")
        top, left = center_crop_offset(height, self.size), center_crop_offset(width, self.size)
        return image[:, top : top + self.size, left : left + self.size].contiguous()


# The (width, height) of image files, read from their headers once per process: DDP ranks and repeated
# setups of the same files then pay the cost once.
_IMAGE_SIZES: dict[str, tuple[int, int]] = {}


def image_sizes(paths: Sequence[str]) -> np.ndarray:
    """``(N, 2)`` int64 ``(width, height)`` of image files, from their headers (no decoding)."""
    from PIL import Image

    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        if path not in _IMAGE_SIZES:
            with Image.open(path) as image:
                _IMAGE_SIZES[path] = image.size
        sizes[i] = _IMAGE_SIZES[path]
    return sizes


# ------------------------------------------------------------------------------------------ file parsing


def _rows(path: Path, fields: int, dataset: str, sep: str | None = None) -> list[list[str]]:
    """Non-empty lines of a metadata file split into exactly ``fields`` fields (the last one keeps spaces)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(sep, fields - 1) if sep is None else line.rstrip("\r\n").split(sep)
        if len(parts) != fields:
            raise CorruptDatasetError(f"{dataset}: {path}:{number}: expected {fields} fields, got {line!r}")
        rows.append([p.strip() for p in parts])
    return rows


def _require(path: Path, dataset: str, hint: str, directory: bool = False) -> None:
    if not (path.is_dir() if directory else path.is_file()):
        raise DatasetNotFoundError(f"{dataset} not found: expected {path}. {hint}")


_CUB_HINT = (
    "CUB-200-2011 cannot be downloaded automatically: get CUB_200_2011.tgz from "
    "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it into --data.data_dir, so that "
    "<data_dir>/CUB_200_2011/images.txt and <data_dir>/CUB_200_2011/images/ exist."
)
_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


@dataclass(frozen=True)
class CUBMetadata:
    """The official CUB-200-2011 metadata, one row per image in ascending id order.

    Attributes:
        ids: image ids (1-based, ascending). paths: absolute image paths. labels: class - 1.
        is_train: the official split. boxes: ``(x, y, w, h)`` in original pixels (float64).
    """

    root: Path
    ids: np.ndarray
    paths: list[str]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray


def _cub_root(data_dir: str | Path) -> Path:
    base = Path(data_dir).expanduser().absolute()
    # The archive's top folder; a data_dir that *is* that folder is accepted too.
    if not (base / "CUB_200_2011").is_dir() and (base / "images.txt").is_file():
        return base
    return base / "CUB_200_2011"


def read_cub(data_dir: str | Path, num_classes: int = 200) -> CUBMetadata:
    """Parse ``<data_dir>/CUB_200_2011/{images,image_class_labels,train_test_split,bounding_boxes}.txt``."""
    root = _cub_root(data_dir)
    for name in _CUB_FILES:
        _require(root / name, "CUB-200-2011", _CUB_HINT)
    _require(root / "images", "CUB-200-2011", _CUB_HINT, directory=True)
    rows = {name: _rows(root / name, 2, "CUB") for name in _CUB_FILES}
    tables = {
        "images.txt": {int(i): p for i, p in rows["images.txt"]},
        "image_class_labels.txt": {int(i): int(c) for i, c in rows["image_class_labels.txt"]},
        "train_test_split.txt": {int(i): int(t) for i, t in rows["train_test_split.txt"]},
        "bounding_boxes.txt": {int(i): [float(v) for v in b.split()] for i, b in rows["bounding_boxes.txt"]},
    }
    ids = np.array(sorted(tables["images.txt"]), dtype=np.int64)
    for name, table in tables.items():
        if set(table) != set(ids.tolist()):
            raise CorruptDatasetError(
                f"CUB: the {len(table)} image ids of {root / name} differ from the {len(ids)} of images.txt"
            )
    labels = np.array([tables["image_class_labels.txt"][i] - 1 for i in ids], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDatasetError(
            f"CUB: {root / 'image_class_labels.txt'} has classes {labels.min() + 1}..{labels.max() + 1}, "
            f"expected 1..{num_classes} (set --data.num_classes for a subset)"
        )
    boxes = np.array([tables["bounding_boxes.txt"][i] for i in ids], dtype=np.float64)
    if boxes.shape != (len(ids), 4):
        raise CorruptDatasetError(f"CUB: {root / 'bounding_boxes.txt'} must hold 'id x y width height' lines")
    paths = [str(root / "images" / tables["images.txt"][i]) for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(
            f"CUB-200-2011 incomplete: {len(missing)} images listed in {root / 'images.txt'} are missing, "
            f"e.g. {missing[0]}. {_CUB_HINT}"
        )
    is_train = np.array([tables["train_test_split.txt"][i] == 1 for i in ids], dtype=bool)
    return CUBMetadata(root=root, ids=ids, paths=paths, labels=labels, is_train=is_train, boxes=boxes)


_TINY_HINT = (
    "Tiny-ImageNet cannot be downloaded by this project: get tiny-imagenet-200.zip "
    "(http://cs231n.stanford.edu/tiny-imagenet-200.zip) and extract it into --data.data_dir, so that "
    "<data_dir>/tiny-imagenet-200/wnids.txt exists."
)
_VAL_NUMBER = re.compile(r"^val_(\d+)\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True)
class TinyMetadata:
    """Tiny-ImageNet-200 file lists. Labels index ``sorted(wnids)``; val rows are in image-number order.

    Attributes:
        val_numbers: ``n`` of ``val_<n>.JPEG``. val_corners: the four annotation numbers (x0, y0, x1, y1).
    """

    root: Path
    wnids: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    val_files: list[str]
    val_paths: list[str]
    val_labels: np.ndarray
    val_numbers: np.ndarray
    val_corners: np.ndarray


def read_tiny_imagenet(data_dir: str | Path) -> TinyMetadata:
    """Parse ``<data_dir>/tiny-imagenet-200``: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/``.

    The per-class training box files (``train/<wnid>/<wnid>_boxes.txt``) are not needed and not read.
    """
    base = Path(data_dir).expanduser().absolute()
    root = base if (base / "wnids.txt").is_file() and not (base / "tiny-imagenet-200").is_dir() else (
        base / "tiny-imagenet-200"
    )
    for path in (root / "wnids.txt", root / "val" / "val_annotations.txt"):
        _require(path, "Tiny-ImageNet", _TINY_HINT)
    _require(root / "val" / "images", "Tiny-ImageNet", _TINY_HINT, directory=True)
    wnids = sorted({line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train_paths: list[str] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        _require(folder, "Tiny-ImageNet", _TINY_HINT, directory=True)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpeg", ".jpg", ".png")))
        train_paths.extend(str(folder / f) for f in files)
        train_labels.extend([index[wnid]] * len(files))
    annotations = root / "val" / "val_annotations.txt"
    rows = _rows(annotations, 6, "Tiny-ImageNet", sep="\t")
    present = set(os.listdir(root / "val" / "images"))
    numbers, files, labels, corners = [], [], [], []
    for name, wnid, *box in rows:
        match = _VAL_NUMBER.match(name)
        if match is None:
            raise CorruptDatasetError(f"Tiny-ImageNet: {annotations}: unexpected file name {name!r}")
        if wnid not in index:
            raise CorruptDatasetError(f"Tiny-ImageNet: {annotations}: {name}: wnid {wnid} not in wnids.txt")
        if name not in present:
            raise DatasetNotFoundError(
                f"Tiny-ImageNet incomplete: expected {root / 'val' / 'images' / name}. {_TINY_HINT}"
            )
        numbers.append(int(match.group(1)))
        files.append(name)
        labels.append(index[wnid])
        corners.append([float(v) for v in box])
    order = np.argsort(np.asarray(numbers, dtype=np.int64), kind="stable")
    val_files = [files[i] for i in order]
    return TinyMetadata(
        root=root,
        wnids=wnids,
        train_paths=train_paths,
        train_labels=np.asarray(train_labels, dtype=np.int64),
        val_files=val_files,
        val_paths=[str(root / "val" / "images" / f) for f in val_files],
        val_labels=np.asarray(labels, dtype=np.int64)[order],
        val_numbers=np.asarray(numbers, dtype=np.int64)[order],
        val_corners=np.asarray(corners, dtype=np.float64).reshape(-1, 4)[order],
    )


def _split_file_names(path: Path) -> set[str]:
    """Image file names listed in a split file: one per line, or the authors' ``id wnid/val_n.JPEG label``.

    On each non-empty, non-``#`` line the first whitespace-separated token ending in ``.jpeg``/``.jpg``
    names the image; its directory part is ignored.
    """
    if not path.is_file():
        raise FileNotFoundError(f"split_file {path} does not exist")
    names: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        token = next((t for t in line.split() if t.lower().endswith((".jpeg", ".jpg"))), None)
        if token is None:
            raise ValueError(f"{path}:{number}: no image file name in {line!r}")
        names.add(token.replace("\\", "/").rsplit("/", 1)[-1])
    return names


# ----------------------------------------------------------------------------------------------- CUB


class _CUBBase(LocalizationDataModule):
    """CUB-200-2011 file handling shared by the WSOL and the PC-softmax protocols."""

    num_classes = 200
    image_size = CUB_CROP
    eval_image_size = CUB_CROP
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, num_classes: int = 200, crop_pad: int | None = 0, **kwargs: Any) -> None:
        self.num_classes = num_classes
        super().__init__(crop_pad=crop_pad, **kwargs)
        self._metadata: CUBMetadata | None = None

    def metadata(self) -> CUBMetadata:
        if self._metadata is None:
            self._metadata = read_cub(self.data_dir, self.num_classes)
        return self._metadata

    def _train_source(self, rows: np.ndarray) -> FileSource:
        meta = self.metadata()
        # Resize((256, 256)) here; the training view (``weak``, crop_pad=0) random-crops 224 and flips.
        return FileSource([meta.paths[i] for i in rows], meta.labels[rows], resize=(CUB_RESIZE, CUB_RESIZE))

    def _make_eval_split(self, rows: np.ndarray, protocol: str) -> EvalSplit:
        meta = self.metadata()
        paths = [meta.paths[i] for i in rows]
        resized = FileSource(paths, meta.labels[rows], resize=(CUB_RESIZE, CUB_RESIZE))
        source = CenterCropSource(resized, CUB_CROP)
        boxes = meta.boxes[rows]
        return EvalSplit(source, protocol, lambda: cub_boxes_to_eval_frame(boxes, image_sizes(paths)))


class CUBDataModule(_CUBBase):
    """CUB-200-2011 for WSOL (spec §6.1): 5,994 training images, the official test set or its halves.

    Args:
        test_split: ``full`` (the 5,794 official test images; the standard protocol) or ``ref_half`` (per
            class, sorted test ids: odd positions are the ``test`` half (2,878), even positions the ``val``
            half (2,916); the authors' lists).
        val_per_class: with ``full``, hold out the first ``m`` training ids of each class as ``val``.
        num_classes: 200 for the real set (smaller for subsets).

    Files: ``<data_dir>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
    bounding_boxes.txt, images/}``. Images are decoded to RGB (some are grayscale) and resized to 256x256;
    evaluation images are centre-cropped to 224. Boxes need every evaluation image's size, read from the
    file headers on the first ``eval_boxes`` call and cached.
    """

    name = "cub"
    default_hflip = True

    def __init__(
        self,
        test_split: Literal["full", "ref_half"] = "full",
        val_per_class: int = 0,
        batch_size: int = 30,
        eval_batch_size: int = 100,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        if test_split not in ("full", "ref_half"):
            raise ValueError(f"test_split must be 'full' or 'ref_half', got {test_split!r}")
        if val_per_class < 0:
            raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
        if val_per_class and test_split == "ref_half":
            raise ValueError("val_per_class applies to test_split='full'; ref_half already has a val half")
        self.test_split = test_split
        self.val_per_class = val_per_class
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         **kwargs)

    @property
    def dataset_key(self) -> str:
        return f"cub_valpc{self.val_per_class}" if self.val_per_class else "cub"

    def _stream_names(self) -> list[str]:
        return ["val", "test"] if self.test_split == "ref_half" or self.val_per_class else ["test"]

    def build_splits(self) -> FixedSplits:
        meta = self.metadata()
        train_rows, test_rows = np.flatnonzero(meta.is_train), np.flatnonzero(~meta.is_train)
        evals: dict[str, EvalSplit] = {}
        if self.val_per_class:
            held = train_rows[first_per_class(meta.labels[train_rows], lambda c: self.val_per_class)]
            evals["val"] = self._make_eval_split(held, f"train_first{self.val_per_class}_per_class")
            train_rows = np.setdiff1d(train_rows, held)
        if self.test_split == "ref_half":
            odd, even = alternate_halves(meta.labels[test_rows])
            evals["val"] = self._make_eval_split(test_rows[even], "ref_half_val")
            evals["test"] = self._make_eval_split(test_rows[odd], "ref_half")
        else:
            evals["test"] = self._make_eval_split(test_rows, "full")
        return FixedSplits(train=self._train_source(train_rows), evals=evals)


def imbalanced_quota(label: int, train: bool) -> int:
    """Images kept per class by the PC-softmax protocol: 10 / 5 for odd 1-based classes, 30 / 15 for even."""
    odd = (label + 1) % 2 == 1
    return (10 if odd else 30) if train else (5 if odd else 15)


class CUBImbalancedDataModule(_CUBBase):
    """CUB-200-2011 under the PC-softmax protocol (spec §6.3), or the full balanced set with ``balanced``.

    Within the official split, each class (1-based ``c``) keeps its first ids in ascending order: 10 train /
    5 test for odd ``c`` (the minority), 30 / 15 for even ``c``, capped by availability. On the real set that
    is 3,997 train and 1,996 test. Evaluation streams: ``test`` (the imbalanced test, whose class ratios
    match training) and ``test_full`` (all 5,794 official test images, near-balanced).

    ``balanced=True`` is the ``cub_balanced`` protocol: all 5,994 / 5,794 images, streams ``["test"]``.
    Boxes are available (as for :class:`CUBDataModule`) but this protocol only needs labels.
    """

    name = "cub_imbalanced"
    default_hflip = True

    def __init__(
        self,
        balanced: bool = False,
        batch_size: int = 64,
        eval_batch_size: int = 100,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        self.balanced = balanced
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         **kwargs)
        # 0-based even labels are the odd 1-based classes.
        self.minority_classes = None if balanced else list(range(0, self.num_classes, 2))

    @property
    def dataset_key(self) -> str:
        return "cub" if self.balanced else "cub_imbalanced"

    def _stream_names(self) -> list[str]:
        return ["test"] if self.balanced else ["test", "test_full"]

    def build_splits(self) -> FixedSplits:
        meta = self.metadata()
        train_rows, test_rows = np.flatnonzero(meta.is_train), np.flatnonzero(~meta.is_train)
        full_test = self._make_eval_split(test_rows, "full")
        if self.balanced:
            return FixedSplits(self._train_source(train_rows), {"test": full_test})
        train_kept = train_rows[first_per_class(meta.labels[train_rows], lambda c: imbalanced_quota(c, True))]
        test_kept = test_rows[first_per_class(meta.labels[test_rows], lambda c: imbalanced_quota(c, False))]
        evals = {
            "test": self._make_eval_split(test_kept, "imbalanced"),
            "test_full": full_test,
        }
        return FixedSplits(self._train_source(train_kept), evals)


# ------------------------------------------------------------------------------------------ Tiny-ImageNet


class TinyImageNetDataModule(LocalizationDataModule):
    """Tiny-ImageNet-200 for WSOL (spec §6.2): 64x64 inputs, training view = random horizontal flip only.

    Args:
        test_split: ``full`` (the 10,000 official val images as ``test``) or ``ref_half`` (per class, sorted
            by val image number: odd positions are ``test``, even positions ``val``).
        split_file: with ``ref_half``, an explicit list of the ``test``-half images (one file name per line,
            or the authors' ``id wnid/val_n.JPEG label`` lines); the other val images form ``val``.
        legacy_xywh_boxes: read the annotations as (x, y, w, h) like the authors (bug B2), only to compare
            with their numbers. The default reads them as inclusive corners: GT = [x0, y0, x1 + 1, y1 + 1].
        num_classes: must equal the number of wnids.

    Labels index ``sorted(wnids)``. The unlabelled official ``test/`` folder is not used.
    """

    name = "tiny_imagenet"
    num_classes = 200
    image_size = TINY_SIZE
    eval_image_size = TINY_SIZE
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    default_hflip = True

    def __init__(
        self,
        test_split: Literal["full", "ref_half"] = "full",
        split_file: str | None = None,
        legacy_xywh_boxes: bool = False,
        num_classes: int = 200,
        batch_size: int = 640,
        eval_batch_size: int = 500,
        num_workers: int = 4,
        crop_pad: int | None = 0,
        **kwargs: Any,
    ) -> None:
        if test_split not in ("full", "ref_half"):
            raise ValueError(f"test_split must be 'full' or 'ref_half', got {test_split!r}")
        if split_file is not None and test_split != "ref_half":
            raise ValueError("split_file defines the halves of test_split='ref_half'; set that test_split")
        self.test_split = test_split
        self.split_file = split_file
        self.legacy_xywh_boxes = legacy_xywh_boxes
        self.num_classes = num_classes
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         crop_pad=crop_pad, **kwargs)

    def _stream_names(self) -> list[str]:
        return ["val", "test"] if self.test_split == "ref_half" else ["test"]

    def _make_eval_split(self, meta: TinyMetadata, rows: np.ndarray, protocol: str) -> EvalSplit:
        paths = [meta.val_paths[i] for i in rows]
        source = FileSource(paths, meta.val_labels[rows], resize=(TINY_SIZE, TINY_SIZE))
        corners = meta.val_corners[rows]
        return EvalSplit(source, protocol, lambda: tiny_boxes_to_eval_frame(corners, self.legacy_xywh_boxes))

    def build_splits(self) -> FixedSplits:
        meta = read_tiny_imagenet(self.data_dir)
        if len(meta.wnids) != self.num_classes:
            raise ValueError(
                f"{meta.root / 'wnids.txt'} lists {len(meta.wnids)} classes, num_classes={self.num_classes}; "
                "set --data.num_classes accordingly"
            )
        # Images are 64x64 already (the resize is then a no-op); the boxes are in that frame.
        train = FileSource(meta.train_paths, meta.train_labels, resize=(TINY_SIZE, TINY_SIZE))
        rows = np.arange(len(meta.val_files))
        if self.test_split == "full":
            return FixedSplits(train, {"test": self._make_eval_split(meta, rows, "full")})
        if self.split_file is None:
            test_rows, val_rows = alternate_halves(meta.val_labels)
            protocol = "ref_half"
        else:
            listed = _split_file_names(Path(self.split_file))
            unknown = listed - set(meta.val_files)
            if unknown:
                raise ValueError(f"split_file {self.split_file} names non-val images: {sorted(unknown)[:5]}")
            in_test = np.array([f in listed for f in meta.val_files], dtype=bool)
            test_rows, val_rows = rows[in_test], rows[~in_test]
            protocol = f"split_file:{Path(self.split_file).name}"
        evals = {"val": self._make_eval_split(meta, val_rows, f"{protocol}_val"),
                 "test": self._make_eval_split(meta, test_rows, protocol)}
        return FixedSplits(train, evals)


# -------------------------------------------------------------------------------------------- Digits-loc


@lru_cache(maxsize=1)
def digits_source_split() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's 1,797 digits (uint8 8x8, values 0..16), their labels, and the fixed source split.

    Within each class, in ascending dataset index, position ``q`` goes to train if ``q mod 10 <= 6``, to
    val if ``q mod 10 == 7`` and to test otherwise: 1,266 / 178 / 353 sources. Each split lists dataset
    indices in ascending order. The arrays are read-only (shared by every caller).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    targets = bunch.target.astype(np.int64)
    position = np.empty(len(targets), dtype=np.int64)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        position[members] = np.arange(len(members))
    phase = position % 10
    splits = {
        "train": np.flatnonzero(phase <= 6),
        "val": np.flatnonzero(phase == 7),
        "test": np.flatnonzero(phase >= 8),
    }
    for array in (images, targets, *splits.values()):
        array.setflags(write=False)
    return images, targets, splits


def render_digit_canvas(
    digit: np.ndarray, rng: np.random.Generator, canvas: int = DIGITS_CANVAS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Digits-loc canvas (spec §6.4): ``(X, L, box)``.

    Draws, in this order: side ``s ~ U{16..40}`` (scaled by ``canvas / 64``), ``x0 ~ U{0..canvas-s}``, ``y0 ~ U{0..canvas-s}``, noise
    ``N ~ Normal(0.2, 0.2)`` of shape (canvas, canvas). ``L`` is the nearest-neighbour digit layer
    ``P(r, c) = D(floor(8r/s), floor(8c/s)) / 16`` placed at rows ``y0..y0+s-1`` and columns ``x0..x0+s-1``;
    ``X = clip(N + L, 0, 1)`` (float64). ``box`` is the tight box of ``{L > 0}`` as int64
    ``[c_min, r_min, c_max + 1, r_max + 1]``.
    """
    low, high = (round(side * canvas / DIGITS_CANVAS) for side in DIGITS_SIDE_RANGE)
    side = int(rng.integers(low, high + 1))
    x0 = int(rng.integers(0, canvas - side + 1))
    y0 = int(rng.integers(0, canvas - side + 1))
    noise = rng.normal(0.2, 0.2, (canvas, canvas))
    cells = (8 * np.arange(side)) // side
    patch = np.asarray(digit, dtype=np.float64)[cells][:, cells] / 16.0
    # Ink rows and columns found on the s x s patch: cheaper than scanning the whole canvas.
    rows, cols = np.flatnonzero(patch.any(axis=1)), np.flatnonzero(patch.any(axis=0))
    if rows.size == 0:
        raise ValueError("a digit without ink has no box")
    layer = np.zeros((canvas, canvas))
    layer[y0 : y0 + side, x0 : x0 + side] = patch
    box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.int64)
    noise += layer
    return np.clip(noise, 0.0, 1.0, out=noise), layer, box


def render_digits_split(
    digits: np.ndarray, source_ids: np.ndarray, split_offset: int, renders: int, base_seed: int = 0,
    canvas: int = DIGITS_CANVAS,
) -> tuple[np.ndarray, np.ndarray]:
    """Canvases of one split: uint8 ``(n * renders, 1, canvas, canvas)`` and float32 boxes ``(n * renders, 4)``.

    Canvas ``j * renders + r`` shows ``digits[j]``, whose scikit-learn dataset index is ``i = source_ids[j]``,
    drawn with ``numpy.random.default_rng([base_seed + split_offset, i, r])``: every rank and worker renders
    the same tensors. (Seeding with the dataset index reproduces the spec's test-split statistics, a mean
    GT box of 20.6 x 28.0 px.) ``X`` in [0, 1] is stored as ``round(255 X)``.
    """
    n = len(digits)
    images = np.empty((n * renders, 1, canvas, canvas), dtype=np.uint8)
    boxes = np.empty((n * renders, 4), dtype=np.float32)
    for j in range(n):
        for r in range(renders):
            rng = np.random.default_rng([base_seed + split_offset, int(source_ids[j]), r])
            image, _, box = render_digit_canvas(digits[j], rng, canvas)
            images[j * renders + r, 0] = np.rint(image * 255.0)
            boxes[j * renders + r] = box
    return images, boxes


class DigitsLocDataModule(LocalizationDataModule):
    """Digits-loc (spec §6.4): an offline WSOL set of scikit-learn digits pasted onto 64x64 noise canvases.

    The source split is 1,266 / 178 / 353 digits (:func:`digits_source_split`); each source is rendered
    ``train_renders`` (train) or ``eval_renders`` (val, test) times at setup by :func:`render_digits_split`
    with split offsets 0 / 1 / 2, identically on every rank: 10,128 / 712 / 1,412 canvases by default.
    Fewer renders (the offline gate's CPU budget) keep the same recipe for the renders that remain.
    ``canvas_size`` scales the canvas and the digit sides together (32 px: sides 8-20 px, a quarter of the
    compute per image); the spec's set is 64 px.

    Deviations from the spec's canvas, both to keep memory small (10,128 canvases take 41 MB): one channel
    (``in_channels = 1``; the spec's 3 identical channels carry no extra information) and uint8 storage of
    ``round(255 X)``. Normalisation (mean 0.5, std 0.5) then gives ``(X_q - 0.5) / 0.5`` with ``|X_q - X| <=
    1/510``. The GT box is the exact tight box of the digit layer. Training view: the identity (``weak``
    with no padding and no flip); a mirrored digit is a different digit, so ``hflip=True`` is refused.
    """

    name = "digits_loc"
    num_classes = 10
    in_channels = 1
    image_size = DIGITS_CANVAS
    eval_image_size = DIGITS_CANVAS
    mean = (0.5,)
    std = (0.5,)
    default_hflip = False

    def __init__(
        self,
        train_renders: int = 8,
        eval_renders: int = 4,
        base_seed: int = 0,
        canvas_size: int = DIGITS_CANVAS,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        crop_pad: int | None = 0,
        hflip: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if train_renders < 1 or eval_renders < 1:
            raise ValueError(f"renders per source must be >= 1, got {train_renders} and {eval_renders}")
        if hflip:
            raise ValueError("Digits-loc never flips: a mirrored digit is a different digit")
        if base_seed < 0:
            raise ValueError(f"base_seed must be >= 0 (numpy seeds are non-negative), got {base_seed}")
        self.train_renders = train_renders
        self.eval_renders = eval_renders
        self.base_seed = base_seed
        if canvas_size < 16:
            raise ValueError(f"canvas_size must be >= 16 px, got {canvas_size}")
        self.image_size = self.eval_image_size = canvas_size
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         crop_pad=crop_pad, hflip=False, **kwargs)

    @property
    def dataset_key(self) -> str:
        canvas = "" if self.image_size == DIGITS_CANVAS else f"_c{self.image_size}"
        return f"digits_loc_r{self.train_renders}_seed{self.base_seed}{canvas}"

    def _stream_names(self) -> list[str]:
        return ["val", "test"]

    def build_splits(self) -> FixedSplits:
        digits, targets, sources = digits_source_split()
        rendered: dict[str, tuple[ArraySource, np.ndarray]] = {}
        for offset, split in enumerate(("train", "val", "test")):
            renders = self.train_renders if split == "train" else self.eval_renders
            rows = sources[split]
            images, boxes = render_digits_split(digits[rows], rows, offset, renders, self.base_seed,
                                                self.image_size)
            rendered[split] = (ArraySource(images, np.repeat(targets[rows], renders)), boxes)
        evals = {
            split: EvalSplit(rendered[split][0], split, lambda boxes=rendered[split][1]: boxes)
            for split in ("val", "test")
        }
        return FixedSplits(train=rendered["train"][0], evals=evals)

    def source_indices(self, split: str) -> np.ndarray:
        """sklearn dataset index of each canvas of ``split`` (``train``, ``val`` or ``test``)."""
        renders = self.train_renders if split == "train" else self.eval_renders
        return np.repeat(digits_source_split()[2][split], renders)

