"""Round trips between the official-format fixture writers and the readers in ``ssl_lightning.data.formats``."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from ssl_lightning.data.formats import (
    CorruptDatasetError,
    DatasetNotFoundError,
    read_cifar10,
    read_cifar100,
    read_idx,
    read_image_folder,
    read_mnist,
    read_stl10,
    read_svhn,
)
from ssl_lightning.data.sources import ArraySource, FileSource, ImageSource
from tests.fixtures.formats import (
    CIFAR100_COARSE_OF_FINE,
    FixtureSplit,
    write_all,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_imagenet,
    write_mnist,
    write_py2_pickle,
    write_stl10,
    write_svhn,
)


def assert_matches(source: ImageSource, expected: FixtureSplit, num_channels: int, size: int) -> None:
    assert isinstance(source, ArraySource)
    assert len(source) == len(expected.labels)
    assert source.num_channels == num_channels
    assert source.targets.dtype == np.int64
    np.testing.assert_array_equal(source.targets, expected.labels)
    for i in (0, len(source) // 2, len(source) - 1):
        image = source.load(i)
        assert image.dtype == torch.uint8 and tuple(image.shape) == (num_channels, size, size)
        np.testing.assert_array_equal(image.numpy(), expected.images[i])


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_round_trip(tmp_path: Path, compress: bool) -> None:
    written = write_mnist(tmp_path, compress=compress)
    for train, split in ((True, "train"), (False, "test")):
        source = read_mnist(tmp_path, train=train)
        assert_matches(source, written[split], 1, 28)
        np.testing.assert_array_equal(source.images[:, 0], written[split].images[:, 0])
        assert np.bincount(source.targets).tolist() == [len(source) // 10] * 10


def test_idx_header_is_official(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=20, n_test=10)
    raw = (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    assert raw[:16] == bytes.fromhex("00000803 00000014 0000001c 0000001c")  # magic 2051, 20 x 28 x 28
    labels = (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    assert labels[:8] == bytes.fromhex("00000801 0000000a")  # magic 2049, 10 labels


def test_idx_multibyte_dtypes(tmp_path: Path) -> None:
    array = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.idx", array)), array)


def test_cifar10_round_trip(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    assert_matches(read_cifar10(tmp_path, train=True), written["train"], 3, 32)
    assert_matches(read_cifar10(tmp_path, train=False), written["test"], 3, 32)
    assert np.bincount(read_cifar10(tmp_path, train=True).targets).tolist() == [20] * 10


def test_cifar_fixture_is_a_python2_pickle(tmp_path: Path) -> None:
    # The official batches only load with an 8-bit codec; a reader relying on the default would break.
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    assert path.read_bytes()[:4] == b"\x80\x02}q"
    with pytest.raises(UnicodeDecodeError), open(path, "rb") as f:
        pickle.load(f)
    with open(path, "rb") as f:
        assert sorted(pickle.load(f, encoding="bytes")) == [b"batch_label", b"data", b"filenames", b"labels"]


def test_cifar_known_pixel_layout(tmp_path: Path) -> None:
    # Row layout written by hand: byte c * 1024 + y * 32 + x is channel c at row y, column x.
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[1, 2 * 1024 + 5 * 32 + 7] = 201
    data[0, 0 * 1024 + 31 * 32 + 0] = 99
    folder = tmp_path / "cifar-10-batches-py"
    write_py2_pickle(
        folder / "test_batch", {"batch_label": "x", "labels": [3, 9], "data": data, "filenames": ["a", "b"]}
    )
    source = read_cifar10(tmp_path, train=False)
    assert source.load(1)[2, 5, 7] == 201 and int(source.load(1).sum()) == 201
    assert source.load(0)[0, 31, 0] == 99
    assert source.targets.tolist() == [3, 9]


def test_cifar_bytes_keys_are_accepted(tmp_path: Path) -> None:
    # Some mirrors re-pickled the batches from Python 3 with bytes keys.
    data = np.full((1, 3072), 7, dtype=np.uint8)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [4]}))
    source = read_cifar10(tmp_path, train=False)
    assert source.targets.tolist() == [4] and int(source.load(0)[1, 3, 3]) == 7


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    fine = read_cifar100(tmp_path, train=True)
    assert_matches(fine, written["train"], 3, 32)
    assert sorted(set(fine.targets.tolist())) == list(range(100))
    coarse = read_cifar100(tmp_path, train=False, coarse=True)
    np.testing.assert_array_equal(coarse.targets, CIFAR100_COARSE_OF_FINE[written["test"].labels])
    assert sorted(set(coarse.targets.tolist())) == list(range(20))
    np.testing.assert_array_equal(coarse.load(3).numpy(), written["test"].images[3])
    # apple -> fruit_and_vegetables, aquarium_fish -> fish, worm -> non-insect_invertebrates
    assert CIFAR100_COARSE_OF_FINE[[0, 1, 99]].tolist() == [4, 1, 13]
    assert np.bincount(CIFAR100_COARSE_OF_FINE).tolist() == [5] * 20


def test_svhn_round_trip_and_zero_label(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    for split in ("train", "test", "extra"):
        source = read_svhn(tmp_path, split)
        assert_matches(source, written[split], 3, 32)
        assert source.targets.min() == 0 and source.targets.max() == 9


def test_svhn_known_pixel_and_label_mapping(tmp_path: Path) -> None:
    from scipy.io import savemat

    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)
    x[4, 9, 1, 2] = 123  # row 4, column 9, green, image 2
    savemat(str(tmp_path / "test_32x32.mat"), {"X": x, "y": np.array([[10], [1], [9]], dtype=np.uint8)})
    source = read_svhn(tmp_path, "test")
    assert source.targets.tolist() == [0, 1, 9]
    assert source.load(2)[1, 4, 9] == 123 and int(source.load(2).sum()) == 123


def test_stl10_round_trip(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    assert_matches(read_stl10(tmp_path, "train"), written["train"], 3, 96)
    assert_matches(read_stl10(tmp_path, "test"), written["test"], 3, 96)
    unlabeled = read_stl10(tmp_path, "unlabeled")
    assert_matches(unlabeled, written["unlabeled"], 3, 96)
    assert (unlabeled.targets == -1).all()


def test_stl10_column_major_transpose(tmp_path: Path) -> None:
    # Build the byte stream by hand in the documented order: channel, then column, then row.
    rows, cols = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    stream = bytearray()
    for channel in range(3):
        for col in range(96):
            for row in range(96):
                stream.append((row * 2 + col * 3 + channel * 50) % 256)
    (folder / "test_X.bin").write_bytes(bytes(stream))
    (folder / "test_y.bin").write_bytes(bytes([10]))
    source = read_stl10(tmp_path, "test")
    assert source.targets.tolist() == [9]
    image = source.load(0).numpy()
    for channel in range(3):
        np.testing.assert_array_equal(image[channel], (rows * 2 + cols * 3 + channel * 50) % 256)


def test_stl10_is_lazy_and_picklable(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=30)
    source = read_stl10(tmp_path, "unlabeled")
    assert source._images is None  # type: ignore[attr-defined]  # nothing mapped before first access
    assert isinstance(source.images.base, np.memmap) or isinstance(source.images, np.memmap)
    source.load(0)
    clone = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 10_000  # the pixels are not shipped to workers
    np.testing.assert_array_equal(clone.load(29).numpy(), written["unlabeled"].images[29])
    assert source.load(1).numpy().flags.writeable


def test_image_folder_shared_class_mapping_and_resize(tmp_path: Path) -> None:
    written = write_imagenet(tmp_path, num_classes=3, per_class=4, val_per_class=2)
    # val lacks class 1: indices must still follow train/, not val's own folder list.
    for f in (tmp_path / "val" / "n01441764").iterdir():
        f.unlink()
    (tmp_path / "val" / "n01441764").rmdir()
    train = read_image_folder(tmp_path, "train")
    val = read_image_folder(tmp_path, "val", resize=(24, 40))
    assert isinstance(train, FileSource)
    np.testing.assert_array_equal(train.targets, written["train"].labels)
    assert val.targets.tolist() == [0, 0, 2, 2]
    sizes = set()
    for i in range(len(train)):
        image = train.load(i)
        assert image.dtype == torch.uint8 and image.shape[0] == 3  # the grayscale JPEG comes back as RGB
        sizes.add(tuple(image.shape[1:]))
    assert len(sizes) > 1
    assert all(tuple(val.load(i).shape) == (3, 24, 40) for i in range(len(val)))


def test_image_folder_extensions_case_insensitive(tmp_path: Path) -> None:
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    for cls, name in (("b", "x.jpg"), ("b", "y.PNG"), ("a", "z.Jpeg"), ("a", "notes.txt")):
        (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
        encoded = (
            torchvision.io.encode_png(image)
            if name.lower().endswith("png")
            else torchvision.io.encode_jpeg(image)
        )
        (tmp_path / "train" / cls / name).write_bytes(encoded.numpy().tobytes())
    source = read_image_folder(tmp_path, "train")
    assert [Path(p).name for p in source.paths] == ["z.Jpeg", "x.jpg", "y.PNG"]
    assert source.targets.tolist() == [0, 1, 1]


def test_write_all_serves_every_reader(tmp_path: Path) -> None:
    write_all(tmp_path)
    assert len(read_mnist(tmp_path, train=True)) == 200
    assert len(read_cifar10(tmp_path, train=False)) == 100
    assert len(read_cifar100(tmp_path, train=True)) == 200
    assert len(read_svhn(tmp_path, "extra")) == 100
    assert len(read_stl10(tmp_path, "unlabeled")) == 100
    assert len(read_image_folder(tmp_path / "imagenet", "val")) == 12


# ------------------------------------------------------------------------------------------ missing files


@pytest.mark.parametrize(
    ("reader", "dataset", "expected"),
    [
        (lambda r: read_mnist(r, train=True), "MNIST", "MNIST/raw/train-images-idx3-ubyte"),
        (lambda r: read_mnist(r, train=False), "MNIST", "MNIST/raw/t10k-images-idx3-ubyte"),
        (lambda r: read_cifar10(r, train=True), "CIFAR-10", "cifar-10-batches-py/data_batch_1"),
        (lambda r: read_cifar10(r, train=False), "CIFAR-10", "cifar-10-batches-py/test_batch"),
        (lambda r: read_cifar100(r, train=True), "CIFAR-100", "cifar-100-python/train"),
        (lambda r: read_svhn(r, "extra"), "SVHN", "extra_32x32.mat"),
        (lambda r: read_stl10(r, "unlabeled"), "STL-10", "stl10_binary/unlabeled_X.bin"),
        (lambda r: read_stl10(r, "train"), "STL-10", "stl10_binary/train_X.bin"),
    ],
)
def test_missing_files_name_path_and_fix(tmp_path: Path, reader: Any, dataset: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        reader(tmp_path / "nowhere")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / expected) in message
    assert dataset in message and "download" in message


def test_missing_later_cifar_batch_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        read_cifar10(tmp_path, train=True)


def test_missing_stl_labels(tmp_path: Path) -> None:
    write_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=1)
    (tmp_path / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_y.bin"):
        read_stl10(tmp_path, "test")


def test_missing_imagenet_explains_layout(tmp_path: Path) -> None:
    for download in (False, True):
        with pytest.raises(DatasetNotFoundError) as info:
            read_image_folder(tmp_path, "val", download=download)
        message = str(info.value)
        assert str(tmp_path / "val") in message and "train/" in message and "cannot be downloaded" in message


def test_flat_imagenet_val_is_rejected(tmp_path: Path) -> None:
    write_imagenet(tmp_path, num_classes=2, per_class=1, val_per_class=1)
    val = tmp_path / "val"
    for f in list(val.rglob("*.JPEG")):
        f.rename(val / f.name)
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(DatasetNotFoundError, match="class folders"):
        read_image_folder(tmp_path, "val")


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        read_svhn(tmp_path, "valid")
    with pytest.raises(ValueError, match="split"):
        read_stl10(tmp_path, "train+unlabeled")


# ----------------------------------------------------------------------------------------------- download


def test_download_delegates_to_torchvision_only_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(name: str, writer: Any) -> Any:
        def dataset(root: str, **kwargs: Any) -> None:
            calls.append((name, kwargs))
            assert kwargs["download"] is True
            writer(root)

        return dataset

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake("CIFAR10", write_cifar10))
    monkeypatch.setattr(torchvision.datasets, "SVHN", fake("SVHN", lambda r: write_svhn(r, splits=("test",))))
    monkeypatch.setattr(torchvision.datasets, "STL10", fake("STL10", write_stl10))
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake("MNIST", lambda r: write_mnist(r, compress=True)))
    assert len(read_cifar10(tmp_path, train=True, download=True)) == 200
    assert len(read_cifar10(tmp_path, train=False, download=True)) == 100  # already there: no second fetch
    assert len(read_svhn(tmp_path, "test", download=True)) == 100
    assert len(read_stl10(tmp_path, "unlabeled", download=True)) == 100
    assert len(read_mnist(tmp_path, train=True, download=True)) == 200
    assert [name for name, _ in calls] == ["CIFAR10", "SVHN", "STL10", "MNIST"]
    assert calls[1][1]["split"] == "test"


def test_download_that_yields_nothing_still_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", lambda root, **kwargs: None)
    with pytest.raises(DatasetNotFoundError, match="even after downloading"):
        read_cifar100(tmp_path, train=True, download=True)


# -------------------------------------------------------------------------------------------- corrupt files


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x1f\x8b" + path.read_bytes()[2:])
    with pytest.raises(CorruptDatasetError, match="magic") as info:
        read_mnist(tmp_path, train=True)
    assert str(path) in str(info.value)


def test_mnist_truncated(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptDatasetError, match="t10k-images-idx3-ubyte"):
        read_mnist(tmp_path, train=False)


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=10, n_test=10, compress=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptDatasetError, match="train-labels-idx1-ubyte.gz"):
        read_mnist(tmp_path, train=True)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=10, n_test=10)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(CorruptDatasetError, match="train-labels-idx1-ubyte"):
        read_mnist(tmp_path, train=True)


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptDatasetError, match="test_batch"):
        read_cifar10(tmp_path, train=False)


def test_cifar100_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "cifar-100-python" / "test"
    write_py2_pickle(path, {"data": np.zeros((1, 3072), dtype=np.uint8), "fine_labels": [0]})
    assert read_cifar100(tmp_path, train=False).targets.tolist() == [0]
    with pytest.raises(CorruptDatasetError, match="coarse_labels"):
        read_cifar100(tmp_path, train=False, coarse=True)


def test_svhn_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(CorruptDatasetError, match="train_32x32.mat"):
        read_svhn(tmp_path, "train")


def test_stl_wrong_byte_count(tmp_path: Path) -> None:
    write_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=2)
    path = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptDatasetError, match="unlabeled_X.bin"):
        read_stl10(tmp_path, "unlabeled")


def test_stl_label_count_mismatch(tmp_path: Path) -> None:
    write_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=1)
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(bytes([1] * 9))
    with pytest.raises(CorruptDatasetError, match="train_y.bin"):
        read_stl10(tmp_path, "train")


def test_image_folder_val_class_not_in_train(tmp_path: Path) -> None:
    write_imagenet(tmp_path, num_classes=2, per_class=1, val_per_class=1)
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(CorruptDatasetError, match="n99999999"):
        read_image_folder(tmp_path, "val")
