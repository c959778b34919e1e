"""The InfoCAM / PC-softmax DataModules: split rules, GT-box geometry, the Digits-loc generator, the MI set.

Spec ``infocam.md`` tests 18 (GT mapping), 20 (split counts) and 21 (Digits-loc generator), plus the
DataModule contracts the InfoCAM module relies on: named evaluation streams covering each split exactly
once across ranks, ``eval_boxes`` in the evaluation frame, ``class_counts`` from the training split only.
CUB and Tiny-ImageNet run on small generated trees in the official formats (tests/fixtures/localization.py).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_lightning.data import (
    CUBDataModule,
    CUBImbalancedDataModule,
    DigitsImbalancedDataModule,
    DigitsLocDataModule,
    GaussianMixtureMIDataModule,
    TinyImageNetDataModule,
)
from ssl_lightning.data.formats import DatasetNotFoundError
from ssl_lightning.data.localization import (
    FixedSplitDataModule,
    cub_boxes_to_eval_frame,
    digits_source_split,
    first_per_class,
    imbalanced_quota,
    render_digit_canvas,
    render_digits_split,
    tiny_boxes_to_eval_frame,
)
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.data.synthetic import bayes_accuracy, true_mi
from tests.fixtures.localization import (
    CUBFixture,
    TinyFixture,
    write_cub,
    write_localization_datasets,
    write_tiny_imagenet,
)

# (train, test) images of 1-based classes 1..6, chosen so the PC-softmax quotas cap some classes (3, 4) and
# cut others (1, 2), and so the ref_half rule meets odd and even class sizes.
CUB_PER_CLASS = [(12, 7), (31, 16), (8, 3), (29, 11), (10, 5), (30, 15)]
# The first official-format test image of class 1 is a 500 x 400 photo with box (100, 50, 200, 300).
CUB_SPECIAL = [((500, 400), (100.0, 50.0, 200.0, 300.0))]
TINY_FORCED = [("n03444034", (0, 32, 44, 62)), ("n03444034", (0, 0, 63, 63))]


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> CUBFixture:
    return write_cub(tmp_path_factory.mktemp("cub"), CUB_PER_CLASS, seed=3, special_test=CUB_SPECIAL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFixture:
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny"), num_classes=3, train_per_class=3,
                               val_per_class=5, seed=4, forced=TINY_FORCED)


@pytest.fixture(scope="module")
def digits_loc(tmp_path_factory: pytest.TempPathFactory) -> DigitsLocDataModule:
    """Digits-loc with the spec's render counts (8 / 4 / 4), rendered once for the module."""
    dm = DigitsLocDataModule(data_dir=str(tmp_path_factory.mktemp("digits_loc")), num_workers=0)
    dm.setup()
    return dm


def _cub(cub: CUBFixture, cls: type = CUBDataModule, **kwargs) -> FixedSplitDataModule:
    dm = cls(data_dir=str(cub.data_dir), num_workers=0, eval_batch_size=8, batch_size=6, num_classes=6,
             labeled_views=["weak"], **kwargs)
    dm.setup()
    return dm


def _ids_by_rule(cub: CUBFixture, train: bool, quota) -> np.ndarray:  # noqa: ANN001
    """Independent restatement of "per class, sort the ids ascending and keep the first quota(c)"."""
    kept = []
    for c in range(len(CUB_PER_CLASS)):
        ids = np.sort(cub.ids[(cub.labels == c) & (cub.is_train == train)])
        kept.extend(ids[: quota(c, len(ids))])
    return np.sort(np.asarray(kept, dtype=np.int64))


def _source_ids(cub: CUBFixture, dm: FixedSplitDataModule, stream: str | None) -> np.ndarray:
    """CUB ids of the images of a stream (``None``: the training split), via their file names."""
    source = dm.sources.train if stream is None else dm.eval_split(stream).source
    while not hasattr(source, "paths"):
        source = source.source  # CenterCropSource wraps the resizing FileSource
    return np.asarray([int(Path(p).stem.rsplit("_", 1)[1]) for p in source.paths], dtype=np.int64)


def _train_batch(dm: FixedSplitDataModule) -> dict[str, StreamBatch]:
    """The first training batch of every stream, as a method receives it."""
    raw = {name: next(iter(loader)) for name, loader in dm.train_dataloader().items()}
    return dm.on_after_batch_transfer(raw, 0)


def _gather_eval(dm: FixedSplitDataModule, world_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every eval loader run as ``world_size`` simulated ranks: per stream, (indices, images), rank order."""
    indices: dict[str, list[torch.Tensor]] = {s: [] for s in dm.eval_streams}
    images: dict[str, list[torch.Tensor]] = {s: [] for s in dm.eval_streams}
    for rank in range(world_size):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=0)
        for name, loader in zip(dm.eval_streams, dm.val_dataloader(), strict=True):
            for *views, _, index in loader:
                indices[name].append(index)
                images[name].append(views[0])
    dm.trainer = None
    return {s: (torch.cat(indices[s]), torch.cat(images[s])) for s in dm.eval_streams}


# ------------------------------------------------------------------------------------ test 18: geometry


def test_cub_gt_mapping_numbers() -> None:
    mapped = cub_boxes_to_eval_frame(np.array([[100.0, 50.0, 200.0, 300.0]]), np.array([[500, 400]]))
    assert mapped.dtype == np.float32
    np.testing.assert_allclose(mapped[0], [35.2, 16.0, 137.6, 208.0], atol=1e-4)
    # Boxes reaching beyond the crop are clipped to [0, 224], not dropped.
    clipped = cub_boxes_to_eval_frame(np.array([[0.0, 0.0, 500.0, 400.0]]), np.array([[500, 400]]))
    np.testing.assert_allclose(clipped[0], [0.0, 0.0, 224.0, 224.0])
    with pytest.raises(ValueError, match="offset"):
        cub_boxes_to_eval_frame(np.zeros((1, 4)), np.ones((1, 2)), resize=257, crop=224)


def test_cub_boxes_match_the_loaded_pixels(cub: CUBFixture) -> None:
    """The mapped box is where the object is in the loaded 224 px image (the dark rectangle)."""
    dm = _cub(cub)
    boxes = dm.eval_boxes("test")
    np.testing.assert_allclose(boxes[0].numpy(), [35.2, 16.0, 137.6, 208.0], atol=1e-4)
    test_rows = np.flatnonzero(~cub.is_train)
    expected = cub_boxes_to_eval_frame(cub.boxes[test_rows], cub.sizes[test_rows])
    torch.testing.assert_close(boxes, torch.from_numpy(expected))
    for index in (0, 1, 5):
        image = dm.eval_split("test").source.load(index).float().mean(0)
        dark = image < 0.5 * (image.max() + image.min())
        rows, cols = torch.nonzero(dark.any(1)).flatten(), torch.nonzero(dark.any(0)).flatten()
        found = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
        # Rounding of the drawn rectangle and the resize's interpolation blur move edges by about a pixel.
        assert torch.allclose(found, boxes[index], atol=2.0), (index, found, boxes[index])


def test_tiny_boxes_are_inclusive_corners(tiny: TinyFixture) -> None:
    corners = np.array([[0, 32, 44, 62], [0, 0, 63, 63]])
    np.testing.assert_array_equal(tiny_boxes_to_eval_frame(corners), [[0, 32, 45, 63], [0, 0, 64, 64]])
    # B2: the authors read the corners as (x, y, w, h).
    legacy_boxes = [[0, 32, 44, 94], [0, 0, 63, 63]]
    np.testing.assert_array_equal(tiny_boxes_to_eval_frame(corners, legacy_xywh=True), legacy_boxes)
    dm = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, num_workers=0)
    torch.testing.assert_close(dm.eval_boxes("test")[:2], torch.tensor([[0.0, 32, 45, 63], [0, 0, 64, 64]]))
    legacy = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, legacy_xywh_boxes=True)
    torch.testing.assert_close(legacy.eval_boxes("test")[:2], torch.tensor(legacy_boxes, dtype=torch.float32))
    assert dm.eval_image_size == 64 and dm.eval_boxes("test").shape == (len(tiny.val_files), 4)


# --------------------------------------------------------------------------------- test 20: split rules


def test_cub_full_and_ref_half_rule(cub: CUBFixture) -> None:
    full = _cub(cub)
    assert full.eval_streams == ["test"] and full.split_name("test") == "full"
    assert np.array_equal(_source_ids(cub, full, None), np.sort(cub.ids[cub.is_train]))
    official_test = np.sort(cub.ids[~cub.is_train])
    assert np.array_equal(_source_ids(cub, full, "test"), official_test)

    half = _cub(cub, test_split="ref_half")
    assert half.eval_streams == ["val", "test"]
    test_ids, val_ids = _source_ids(cub, half, "test"), _source_ids(cub, half, "val")
    odd = _ids_by_rule(cub, False, lambda c, n: n)  # all test ids, then split by position below
    expected_test = [i for c in range(6) for i in np.sort(odd[cub.labels[odd - 1] == c])[1::2]]
    assert np.array_equal(test_ids, np.sort(expected_test))
    assert not set(test_ids) & set(val_ids) and np.array_equal(np.union1d(test_ids, val_ids), official_test)
    sizes = [n for _, n in CUB_PER_CLASS]
    assert len(test_ids) == sum(n // 2 for n in sizes) and len(val_ids) == sum((n + 1) // 2 for n in sizes)
    assert half.split_size("test") == len(test_ids) and half.split_name("val") == "ref_half_val"
    # The training split is the official one, and the prior comes from it alone.
    assert torch.equal(half.class_counts(), torch.tensor([t for t, _ in CUB_PER_CLASS]))


def test_cub_val_per_class_holds_out_first_training_ids(cub: CUBFixture) -> None:
    dm = _cub(cub, val_per_class=2)
    assert dm.eval_streams == ["val", "test"]
    val_ids = _source_ids(cub, dm, "val")
    assert np.array_equal(val_ids, _ids_by_rule(cub, True, lambda c, n: 2))
    assert not set(val_ids) & set(_source_ids(cub, dm, None))
    assert int(dm.class_counts().sum()) == int(cub.is_train.sum()) - 12 == len(dm.sources.train)
    with pytest.raises(ValueError, match="val_per_class"):
        CUBDataModule(data_dir=str(cub.data_dir), test_split="ref_half", val_per_class=1)


def test_cub_imbalanced_rule(cub: CUBFixture) -> None:
    dm = _cub(cub, CUBImbalancedDataModule)
    assert dm.eval_streams == ["test", "test_full"]
    assert dm.minority_classes == [0, 2, 4]  # the odd 1-based classes

    def quota(train: bool):  # noqa: ANN202
        return lambda c, n: (10 if c % 2 == 0 else 30) if train else (5 if c % 2 == 0 else 15)

    assert np.array_equal(_source_ids(cub, dm, None), _ids_by_rule(cub, True, quota(True)))
    assert np.array_equal(_source_ids(cub, dm, "test"), _ids_by_rule(cub, False, quota(False)))
    assert np.array_equal(_source_ids(cub, dm, "test_full"), np.sort(cub.ids[~cub.is_train]))
    # Capped by availability: classes 3 and 4 keep all they have.
    assert dm.class_counts().tolist() == [10, 30, 8, 29, 10, 30]
    assert np.bincount(dm.eval_split("test").source.targets).tolist() == [5, 15, 3, 11, 5, 15]
    assert dm.split_name("test") == "imbalanced" and dm.split_name("test_full") == "full"

    balanced = _cub(cub, CUBImbalancedDataModule, balanced=True)
    assert balanced.eval_streams == ["test"] and balanced.minority_classes is None
    assert len(balanced.sources.train) == int(cub.is_train.sum())
    assert balanced.split_size("test") == int((~cub.is_train).sum())


def test_cub_imbalanced_counts_on_the_real_class_sizes() -> None:
    """The quota rule on CUB's real per-class sizes gives the spec's 3,997 / 1,996 (100x10 + 97x30 + 3x29;
    100x5 + 99x15 + 1x11): every class has >= 29 training and >= 11 test images."""
    train_sizes = [29 if c in (1, 3, 5) else 30 for c in range(200)]  # three even 1-based classes hold 29
    test_sizes = [11 if c == 7 else 29 for c in range(200)]  # one even 1-based class holds 11
    for sizes, train, total in ((train_sizes, True, 3997), (test_sizes, False, 1996)):
        labels = np.repeat(np.arange(200), sizes)
        kept = first_per_class(labels, lambda c, train=train: imbalanced_quota(c, train))
        assert len(kept) == total


def test_tiny_imagenet_labels_order_and_halves(tiny: TinyFixture, tmp_path: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, num_workers=0, eval_batch_size=4,
                                test_split="ref_half")
    dm.setup()
    assert dm.eval_streams == ["val", "test"]
    # Labels index sorted(wnids) although wnids.txt is not sorted.
    assert tiny.wnids != sorted(tiny.wnids)
    assert np.array_equal(dm.sources.train.targets, tiny.train_labels)
    numbers = [int(Path(p).stem.split("_")[1]) for p in dm.eval_split("test").source.paths]
    assert numbers == sorted(numbers)  # val_10 after val_9: by number, not by name
    test_files = {Path(p).name for p in dm.eval_split("test").source.paths}
    val_files = {Path(p).name for p in dm.eval_split("val").source.paths}
    expected = set()
    for c in range(3):
        members = [f for f, label in zip(tiny.val_files, tiny.val_labels, strict=True) if label == c]
        expected |= set(sorted(members, key=lambda f: int(f[4:-5]))[1::2])
    assert test_files == expected and not test_files & val_files
    assert test_files | val_files == set(tiny.val_files)

    # An explicit split file in the authors' datalist format: "<id> <wnid>/<file> <label>".
    chosen = tiny.val_files[:3]
    split_file = tmp_path / "test_half.txt"
    split_file.write_text("".join(f"{k} {tiny.wnids[0]}/{name} 7\n" for k, name in enumerate(chosen)))
    listed = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, num_workers=0,
                                    test_split="ref_half", split_file=str(split_file))
    assert [Path(p).name for p in listed.eval_split("test").source.paths] == chosen
    assert listed.split_size("val") == len(tiny.val_files) - 3
    with pytest.raises(ValueError, match="ref_half"):
        TinyImageNetDataModule(data_dir=str(tiny.data_dir), split_file=str(split_file))
    with pytest.raises(ValueError, match="num_classes"):
        TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_workers=0).setup()


def test_digits_loc_split_counts(digits_loc: DigitsLocDataModule) -> None:
    _, targets, sources = digits_source_split()
    assert [len(sources[s]) for s in ("train", "val", "test")] == [1266, 178, 353]
    assert not set(sources["train"]) & set(sources["val"]) and not set(sources["val"]) & set(sources["test"])
    for split in ("train", "val", "test"):
        counts = np.bincount(targets[sources[split]], minlength=10)
        assert counts.min() > 0
    assert len(digits_loc.sources.train) == 10128
    assert [digits_loc.split_size(s) for s in digits_loc.eval_streams] == [712, 1412]
    assert digits_loc.eval_streams == ["val", "test"]
    counts = digits_loc.class_counts()
    assert counts.sum() == 10128
    assert torch.equal(counts, 8 * torch.bincount(torch.from_numpy(targets[sources["train"]])))


def test_digits_imbalanced_split(tmp_path: Path) -> None:
    dm = DigitsImbalancedDataModule(data_dir=str(tmp_path), num_workers=0)
    dm.request_views(["weak"], [])
    dm.setup()
    counts = dm.class_counts()
    assert int(counts.sum()) == 702 and counts[0::2].tolist() == [13] * 5
    assert all(126 <= int(n) <= 129 for n in counts[1::2])
    assert [dm.split_size(s) for s in dm.eval_streams] == [178, 353]
    assert dm.minority_classes == [0, 2, 4, 6, 8]
    # Even digits keep their *first* training sources by dataset index.
    digits, targets, sources = digits_source_split()
    zeros = sources["train"][targets[sources["train"]] == 0][:13]
    kept_zeros = dm.sources.train.images[dm.sources.train.targets == 0][:, 0]
    assert np.array_equal(kept_zeros, digits[zeros])
    # Inputs reach the model as pixel / 16.
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    expected = torch.from_numpy(digits[sources["test"][: len(batch.targets)]]).float()[:, None] / 16
    torch.testing.assert_close(batch.views[0], expected)
    train = _train_batch(dm)["labeled"]
    assert train.views[0].shape == (64, 1, 8, 8) and float(train.views[0].max()) <= 1.0


# --------------------------------------------------------------------------- test 21: Digits-loc renders


def test_digits_loc_recipe_is_exact(digits_loc: DigitsLocDataModule) -> None:
    """The spec's recipe restated independently reproduces the stored canvases bit for bit."""
    digits, _, sources = digits_source_split()
    stored = digits_loc.eval_split("test").source.images
    for position, r in ((0, 0), (17, 3), (352, 2)):
        i = int(sources["test"][position])
        rng = np.random.default_rng([0 + 2, i, r])  # base seed 0, test split offset 2, dataset index i
        s = rng.integers(16, 41)
        x0 = rng.integers(0, 64 - s + 1)
        y0 = rng.integers(0, 64 - s + 1)
        noise = rng.normal(0.2, 0.2, (64, 64))
        layer = np.zeros((64, 64))
        for row in range(s):
            for col in range(s):
                layer[y0 + row, x0 + col] = digits[i][8 * row // s, 8 * col // s] / 16
        canvas = np.rint(np.clip(noise + layer, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(stored[position * 4 + r, 0], canvas)


def test_digits_loc_boxes_are_tight_and_nontrivial(digits_loc: DigitsLocDataModule) -> None:
    digits, _, sources = digits_source_split()
    boxes = digits_loc.eval_boxes("test")
    assert boxes.dtype == torch.float32 and boxes.shape == (1412, 4)
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 64
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert float(width.max()) <= 40 and float(height.max()) <= 40 and float(height.max()) > 30
    # The spec's test-split statistics (they pin the seeding by dataset index).
    assert round(float(width.mean()), 1) == 20.6 and round(float(height.mean()), 1) == 28.0
    for j, i in enumerate(sources["test"]):
        for r in range(4):
            _, layer, box = render_digit_canvas(digits[i], np.random.default_rng([2, int(i), r]))
            assert np.array_equal(box, boxes[j * 4 + r].numpy())
            x1, y1, x2, y2 = box
            ink = layer > 0
            # The box holds all ink (the oracle map 1[L > 0] boxed whole gives IoU 1) ...
            assert ink[y1:y2, x1:x2].sum() == ink.sum()
            # ... and each of its edge rows and columns holds some.
            assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()
            assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()
    # A whole-canvas box localises (IoU >= 0.5) less than 1% of the test canvases.
    iou_whole = width * height / 64**2
    assert float((iou_whole >= 0.5).float().mean()) < 0.01


def test_digits_loc_renders_are_deterministic(digits_loc: DigitsLocDataModule) -> None:
    digits, _, sources = digits_source_split()
    images, boxes = render_digits_split(digits[sources["val"]], sources["val"], 1, 4)
    assert np.array_equal(images, digits_loc.eval_split("val").source.images)
    assert torch.equal(torch.from_numpy(boxes), digits_loc.eval_boxes("val"))
    # Fewer training renders leave the evaluation canvases untouched, and training canvases are a prefix.
    small = DigitsLocDataModule(data_dir=str(digits_loc.data_dir), train_renders=1, num_workers=0)
    small.setup()
    assert np.array_equal(small.eval_split("test").source.images, digits_loc.eval_split("test").source.images)
    assert np.array_equal(small.sources.train.images, digits_loc.sources.train.images[::8])
    # Any rank split and any worker count deliver the same tensors.
    gathered = _gather_eval(digits_loc, world_size=2)
    for stream in ("val", "test"):
        indices, batch = gathered[stream]
        assert torch.equal(indices, torch.arange(digits_loc.split_size(stream)))
        assert torch.equal(batch, torch.from_numpy(digits_loc.eval_split(stream).source.images))
    small.num_workers = 2
    loaded = torch.cat([views for views, _, _ in small.val_dataloader()[0]])
    assert torch.equal(loaded, torch.from_numpy(digits_loc.eval_split("val").source.images))
    with pytest.raises(ValueError, match="flip"):
        DigitsLocDataModule(hflip=True)


# ------------------------------------------------------------------------------------ loaders and errors


def test_missing_datasets_name_the_expected_path(tmp_path: Path, cub: CUBFixture) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        CUBDataModule(data_dir=str(tmp_path / "nowhere")).setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "CUB_200_2011" / "images.txt") in message
    assert "cannot be downloaded" in message and "caltech" in message
    with pytest.raises(DatasetNotFoundError) as info:
        TinyImageNetDataModule(data_dir=str(tmp_path / "nowhere")).setup()
    assert str(tmp_path / "nowhere" / "tiny-imagenet-200" / "wnids.txt") in str(info.value)
    # A listed image that is missing is named too.
    broken = tmp_path / "broken"
    shutil.copytree(cub.data_dir / "CUB_200_2011", broken / "CUB_200_2011")
    victim = next((broken / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        CUBDataModule(data_dir=str(broken), num_classes=6).setup()


def test_grayscale_jpegs_load_as_rgb(cub: CUBFixture, tiny: TinyFixture) -> None:
    dm = _cub(cub)
    train_rows = np.flatnonzero(cub.is_train)
    grey = int(np.flatnonzero(cub.grey[train_rows])[0])
    image = dm.sources.train.load(grey)
    assert image.shape == (3, 256, 256)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    test_grey = int(np.flatnonzero(cub.grey[~cub.is_train])[0])
    assert dm.eval_split("test").source.load(test_grey).shape == (3, 224, 224)
    tiny_dm = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, num_workers=0)
    grey_val = int(np.flatnonzero(tiny.grey_val)[0])
    assert tiny_dm.eval_split("test").source.load(grey_val).shape == (3, 64, 64)


@pytest.mark.parametrize("kwargs", [{"test_split": "ref_half"}, {"val_per_class": 1}, {}])
def test_eval_indices_cover_each_split_once_across_ranks(cub: CUBFixture, kwargs: dict) -> None:
    dm = _cub(cub, **kwargs)
    single, double = _gather_eval(dm, world_size=1), _gather_eval(dm, world_size=2)
    for stream in dm.eval_streams:
        indices, _ = double[stream]
        assert sorted(indices.tolist()) == list(range(dm.split_size(stream)))
        assert torch.equal(indices, single[stream][0])
        assert torch.equal(double[stream][1], single[stream][1])


def test_batches_are_normalised_tensors(cub: CUBFixture, tiny: TinyFixture) -> None:
    dm = _cub(cub, CUBImbalancedDataModule)
    train = _train_batch(dm)
    assert set(train) == {"labeled"}  # supervised: no unlabeled stream
    labeled = train["labeled"]
    assert labeled.views[0].shape == (6, 3, 224, 224) and labeled.views[0].dtype == torch.float32
    assert float(labeled.views[0].min()) < 0  # ImageNet normalisation, not raw [0, 1]
    for loader, stream in zip(dm.val_dataloader(), dm.eval_streams, strict=True):
        batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
        assert batch.views[0].shape == (8, 3, 224, 224) and batch.views[0].dtype == torch.float32
        assert torch.equal(batch.indices, torch.arange(8))
        assert torch.equal(batch.targets, dm.eval_targets(stream)[:8])
    tiny_dm = TinyImageNetDataModule(data_dir=str(tiny.data_dir), num_classes=3, num_workers=0, batch_size=4,
                                     eval_batch_size=4, labeled_views=["weak"])
    assert _train_batch(tiny_dm)["labeled"].views[0].shape == (4, 3, 64, 64)
    assert int(tiny_dm.class_counts().sum()) == len(tiny.train_labels)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="val_size"):
        CUBDataModule(val_size=200)
    with pytest.raises(ValueError, match="test_split"):
        CUBDataModule(test_split="half")


def test_smoke_trees_for_experiments(tmp_path: Path) -> None:
    """``write_localization_datasets`` gives every class of both sets, so an experiment runs unchanged."""
    write_localization_datasets(tmp_path)
    for dm in (CUBDataModule(data_dir=str(tmp_path), num_workers=0, test_split="ref_half"),
               CUBImbalancedDataModule(data_dir=str(tmp_path), num_workers=0),
               TinyImageNetDataModule(data_dir=str(tmp_path), num_workers=0, test_split="ref_half")):
        counts = dm.class_counts()
        assert counts.shape == (200,) and int(counts.min()) > 0  # an empirical prior without empty classes
        for stream in dm.eval_streams:
            assert dm.eval_boxes(stream).shape == (dm.split_size(stream), 4)


# ----------------------------------------------------------------------------------- Gaussian mixture


# Spec §7.2: (d, I balanced, I imbalanced, Bayes acc balanced, imbalanced prior rule, imbalanced macro).
MI_TABLE = [
    (1, 1.0314, 1.0224, 74.62, 79.86, 74.62),
    (2, 1.3003, 1.2393, 87.42, 89.88, 87.42),
    (5, 1.5544, 1.4449, 97.97, 98.35, 97.97),
    (10, 1.6058, 1.4868, 99.87, 99.90, 99.87),
]
IMBALANCED_PRIOR = [5, 10, 15, 20, 25]


@pytest.mark.parametrize(("dim", "mi_bal", "mi_imb", "acc_bal", "acc_imb", "macro_imb"), MI_TABLE)
def test_true_mi_and_bayes_accuracy_table(
    dim: int, mi_bal: float, mi_imb: float, acc_bal: float, acc_imb: float, macro_imb: float
) -> None:
    assert true_mi(dim, [1] * 5) == pytest.approx(mi_bal, abs=1e-3)
    assert true_mi(dim, IMBALANCED_PRIOR) == pytest.approx(mi_imb, abs=1e-3)
    assert 100 * bayes_accuracy(dim, [1] * 5) == pytest.approx(acc_bal, abs=0.01)
    assert 100 * bayes_accuracy(dim, IMBALANCED_PRIOR) == pytest.approx(acc_imb, abs=0.01)
    assert 100 * bayes_accuracy(dim, IMBALANCED_PRIOR, rule="balanced", macro=True) == pytest.approx(
        macro_imb, abs=0.01
    )


def test_true_mi_limits() -> None:
    # Far-apart classes: I -> H(Y); a single class: I = 0.
    p = np.array(IMBALANCED_PRIOR) / 75
    assert true_mi(400, IMBALANCED_PRIOR) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-6)
    assert true_mi(3, [0, 0, 1, 0, 0]) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_mixture_datamodule(tmp_path: Path) -> None:
    dm = GaussianMixtureMIDataModule(data_dir=str(tmp_path), dim=2, balanced=False, labeled_views=["weak"])
    assert dm.in_channels * dm.image_size**2 == 2 and dm.num_classes == 5
    assert dm.eval_streams == ["val", "test"]
    dm.setup()
    assert dm.class_counts().tolist() == [5000, 10000, 15000, 20000, 25000]
    assert [dm.split_size(s) for s in dm.eval_streams] == [15000, 15000]
    val_x, _ = dm.eval_features("val")
    test_x, test_y = dm.eval_features("test")
    assert val_x.shape == (15000, 2) and not torch.equal(val_x, test_x)  # each split has its own seed
    # Class means along 1_d.
    for k, a in enumerate((0.0, 2.0, -2.0, 4.0, -4.0)):
        assert float(test_x[test_y == k].mean()) == pytest.approx(a, abs=0.05)
    # The MC mean of the true PMI estimates I within its standard error.
    mi = dm.true_mi()
    assert mi == pytest.approx(1.2393, abs=1e-3)
    from ssl_lightning.data.synthetic import true_pmi

    pmi = true_pmi(test_x.numpy(), test_y.numpy(), dm.prior())
    assert dm.test_true_pmi_mean() == pytest.approx(float(pmi.mean()))
    assert abs(dm.test_true_pmi_mean() - mi) < 4 * pmi.std() / math.sqrt(len(pmi))
    # Features pass through: any requested view is the identity, nothing is normalised.
    labeled = _train_batch(dm)["labeled"]
    assert labeled.views[0].shape == (2000, 2) and labeled.views[0].dtype == torch.float32
    train_source = dm.sources.train
    torch.testing.assert_close(labeled.views[0], train_source.features[labeled.indices])
    balanced = GaussianMixtureMIDataModule(data_dir=str(tmp_path), dim=1, balanced=True, count_scale=0.1)
    assert balanced.class_counts().tolist() == [1000] * 5 and balanced.split_size("test") == 1000
    assert balanced.minority_classes is None
