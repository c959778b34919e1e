"""The embedded offline dataset: scikit-learn's 1,797 real 8×8 handwritten digits.

It is the default demo and the dataset of every quality gate, so one recipe serves all methods:
pixels ÷16, bilinear upsampling to 16×16, one channel; a fixed stratified test split of 360 images
(split seed 0, independent of the run seed) leaving a pool of 1,437 training images; weak view =
reflect-pad 2 px + random 16×16 crop, no flip; strong = weak + RandAugment + Cutout.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ssl_lightning.data.module import Sources, SSLDataModule
from ssl_lightning.data.sources import ArraySource

DIGITS_SIZE = 16
DIGITS_TEST_SIZE = 360


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train targets, test images, test targets); images uint8 (N, 1, 16, 16)."""
    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    upsampled = F.interpolate(pixels, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (upsampled * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    targets = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=DIGITS_TEST_SIZE, stratify=targets, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return images[train_idx], targets[train_idx], images[test_idx], targets[test_idx]


class DigitsDataModule(SSLDataModule):
    """scikit-learn digits at 16×16, one channel (see the module docstring for the fixed recipe)."""

    name = "digits"
    num_classes = 10
    in_channels = 1
    image_size = DIGITS_SIZE
    # Measured over all 1,797 upsampled images.
    mean = (0.3053,)
    std = (0.3186,)
    default_hflip = False

    def __init__(
        self,
        batch_size: int = 16,
        mu: int = 3,
        eval_batch_size: int = 360,
        num_labels: int | None = 40,
        crop_pad: int | None = 2,
        num_workers: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            batch_size=batch_size, mu=mu, eval_batch_size=eval_batch_size, num_labels=num_labels,
            crop_pad=crop_pad, num_workers=num_workers, **kwargs,
        )

    def build_sources(self) -> Sources:
        train_x, train_y, test_x, test_y = digits_arrays()
        return Sources(train=ArraySource(train_x, train_y), test=ArraySource(test_x, test_y))
