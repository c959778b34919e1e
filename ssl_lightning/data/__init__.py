"""DataModules shared by every method, and the data protocol pieces they are built from."""

from ssl_lightning.data.datasets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageNetDataModule,
    MNISTDataModule,
    STL10DataModule,
    SVHNDataModule,
)
from ssl_lightning.data.digits import DigitsDataModule
from ssl_lightning.data.module import SSLDataModule, StreamBatch

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SSLDataModule",
    "STL10DataModule",
    "SVHNDataModule",
    "StreamBatch",
]
