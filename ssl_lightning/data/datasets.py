"""DataModules of the real datasets: each says where its images come from and how to normalise them.

Files are read from the official on-disk formats by ``formats.py``; ``--data.download=true`` fetches
them with torchvision where the source allows it.
"""

from __future__ import annotations

from ssl_lightning.data import formats
from ssl_lightning.data.module import Sources, SSLDataModule
from ssl_lightning.data.sources import ConcatSource


class MNISTDataModule(SSLDataModule):
    """MNIST, 28×28, one channel."""

    name = "mnist"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)
    default_hflip = False

    def build_sources(self) -> Sources:
        return Sources(
            train=formats.read_mnist(self.data_dir, train=True, download=self.download),
            test=formats.read_mnist(self.data_dir, train=False, download=self.download),
        )


class CIFAR10DataModule(SSLDataModule):
    """CIFAR-10 from the official python pickles."""

    name = "cifar10"
    num_classes = 10
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2471, 0.2435, 0.2616)

    def build_sources(self) -> Sources:
        return Sources(
            train=formats.read_cifar10(self.data_dir, train=True, download=self.download),
            test=formats.read_cifar10(self.data_dir, train=False, download=self.download),
        )


class CIFAR100DataModule(SSLDataModule):
    """CIFAR-100; ``superclasses=True`` uses the 20 coarse labels stored in the same pickles."""

    name = "cifar100"
    image_size = 32
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)

    def __init__(self, superclasses: bool = False, **kwargs) -> None:
        self.superclasses = superclasses
        self.num_classes = 20 if superclasses else 100
        super().__init__(**kwargs)

    @property
    def dataset_key(self) -> str:
        return "cifar100_20" if self.superclasses else "cifar100"

    def build_sources(self) -> Sources:
        return Sources(
            train=formats.read_cifar100(self.data_dir, train=True, download=self.download, coarse=self.superclasses),
            test=formats.read_cifar100(self.data_dir, train=False, download=self.download, coarse=self.superclasses),
        )


class SVHNDataModule(SSLDataModule):
    """SVHN ``train`` (+ ``extra`` with ``use_extra``: labels are then drawn from the combined pool)."""

    name = "svhn"
    num_classes = 10
    image_size = 32
    mean = (0.4380, 0.4440, 0.4730)
    std = (0.1751, 0.1771, 0.1744)
    # Digits are not mirror-symmetric: the FixMatch recipe does not flip SVHN (``hflip`` overrides).
    default_hflip = False

    def __init__(self, use_extra: bool = False, **kwargs) -> None:
        self.use_extra = use_extra
        super().__init__(**kwargs)

    @property
    def dataset_key(self) -> str:
        return "svhn_extra" if self.use_extra else "svhn"

    def build_sources(self) -> Sources:
        train = formats.read_svhn(self.data_dir, "train", download=self.download)
        if self.use_extra:
            train = ConcatSource([train, formats.read_svhn(self.data_dir, "extra", download=self.download)])
        return Sources(train=train, test=formats.read_svhn(self.data_dir, "test", download=self.download))


class STL10DataModule(SSLDataModule):
    """STL-10 at 96×96: labeled ``train`` (5k), ``test`` (8k), and the 100k ``unlabeled`` images."""

    name = "stl10"
    num_classes = 10
    image_size = 96
    mean = (112.4 / 255, 109.1 / 255, 98.6 / 255)
    std = (68.4 / 255, 66.6 / 255, 68.5 / 255)

    def __init__(self, use_unlabeled_split: bool = True, **kwargs) -> None:
        self.use_unlabeled_split = use_unlabeled_split
        super().__init__(**kwargs)

    def build_sources(self) -> Sources:
        extra = formats.read_stl10(self.data_dir, "unlabeled", download=self.download) if self.use_unlabeled_split else None
        return Sources(
            train=formats.read_stl10(self.data_dir, "train", download=self.download),
            test=formats.read_stl10(self.data_dir, "test", download=self.download),
            extra_unlabeled=extra,
        )


class ImageNetDataModule(SSLDataModule):
    """ImageNet as ImageFolder ``train/`` and ``val/`` (class folders) under ``data_dir``.

    Training images are resized to ``train_resize`` (square, aspect not kept, as the InfoMatch reference)
    and the weak view crops ``image_size`` from them; test images are resized straight to ``image_size``.
    """

    name = "imagenet"
    num_classes = 1000
    image_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self, num_classes: int = 1000, image_size: int = 224, train_resize: int = 256, crop_pad: int | None = 0,
        **kwargs,
    ) -> None:
        self.num_classes = num_classes
        self.image_size = image_size
        self.train_resize = train_resize
        super().__init__(crop_pad=crop_pad, **kwargs)

    def build_sources(self) -> Sources:
        train = formats.read_image_folder(self.data_dir, "train", resize=(self.train_resize, self.train_resize))
        test = formats.read_image_folder(self.data_dir, "val", resize=(self.image_size, self.image_size))
        if int(train.targets.max()) >= self.num_classes:
            raise ValueError(
                f"{self.data_dir / 'train'} has {int(train.targets.max()) + 1} class folders but "
                f"num_classes={self.num_classes}; set --data.num_classes accordingly"
            )
        return Sources(train=train, test=test)
