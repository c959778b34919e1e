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
from ssl_lightning.data.localization import (
    CUBDataModule,
    CUBImbalancedDataModule,
    DigitsLocDataModule,
    FixedSplitDataModule,
    LocalizationDataModule,
    TinyImageNetDataModule,
)
from ssl_lightning.data.module import SSLDataModule, StreamBatch
from ssl_lightning.data.synthetic import DigitsImbalancedDataModule, GaussianMixtureMIDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUBDataModule",
    "CUBImbalancedDataModule",
    "DigitsDataModule",
    "DigitsImbalancedDataModule",
    "DigitsLocDataModule",
    "FixedSplitDataModule",
    "GaussianMixtureMIDataModule",
    "ImageNetDataModule",
    "LocalizationDataModule",
    "MNISTDataModule",
    "SSLDataModule",
    "STL10DataModule",
    "SVHNDataModule",
    "StreamBatch",
    "TinyImageNetDataModule",
]
