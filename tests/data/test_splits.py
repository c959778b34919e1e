"""Label-split protocols: counts, determinism, pool disjointness, long tail, noise and the index files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_lightning.data.splits import (
    Split,
    SplitFileError,
    SplitSpec,
    canonical_json,
    load_or_create_split,
    long_tail_counts,
    make_split,
    payload_sha256,
    split_filename,
)

C = 10


def balanced_targets(per_class: int, num_classes: int = C, seed: int = 0) -> np.ndarray:
    # Shuffled so that class membership is not trivially tied to index order.
    targets = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(targets).astype(np.int64)


@pytest.fixture(scope="module")
def targets() -> np.ndarray:
    return balanced_targets(200)


def class_counts(split_targets: np.ndarray, num_classes: int = C) -> list[int]:
    return np.bincount(split_targets, minlength=num_classes).tolist()


def test_balanced_counts(targets: np.ndarray) -> None:
    split = make_split(targets, C, SplitSpec(num_labels=40))
    assert split.labeled_indices.dtype == np.int64
    assert class_counts(targets[split.labeled_indices]) == [4] * C
    np.testing.assert_array_equal(split.labeled_targets, targets[split.labeled_indices])
    np.testing.assert_array_equal(split.clean_labeled_targets, split.labeled_targets)
    # The literature default: the unlabeled pool is the whole training set, labeled images included.
    np.testing.assert_array_equal(split.unlabeled_indices, np.arange(len(targets)))
    assert split.val_indices.size == 0
    assert split.path is None


def test_indivisible_num_labels_rejected(targets: np.ndarray) -> None:
    with pytest.raises(ValueError, match="divisible"):
        make_split(targets, C, SplitSpec(num_labels=45))


def test_deterministic_in_seed_and_different_across_seeds(targets: np.ndarray) -> None:
    a = make_split(targets, C, SplitSpec(num_labels=40, split_seed=3))
    b = make_split(targets, C, SplitSpec(num_labels=40, split_seed=3))
    c = make_split(targets, C, SplitSpec(num_labels=40, split_seed=4))
    np.testing.assert_array_equal(a.labeled_indices, b.labeled_indices)
    assert a.sha256 == b.sha256
    assert not np.array_equal(a.labeled_indices, c.labeled_indices)
    assert a.sha256 != c.sha256


def test_labeled_sets_are_nested_across_sizes(targets: np.ndarray) -> None:
    small = make_split(targets, C, SplitSpec(num_labels=40, split_seed=1))
    large = make_split(targets, C, SplitSpec(num_labels=250, split_seed=1))
    assert set(small.labeled_indices) <= set(large.labeled_indices)


def test_val_is_disjoint_and_balanced(targets: np.ndarray) -> None:
    split = make_split(targets, C, SplitSpec(num_labels=100, val_size=50))
    val = set(split.val_indices.tolist())
    assert class_counts(targets[split.val_indices]) == [5] * C
    assert val.isdisjoint(split.labeled_indices.tolist())
    assert val.isdisjoint(split.unlabeled_indices.tolist())
    # "all" = every non-validation image.
    assert len(split.unlabeled_indices) == len(targets) - 50
    assert set(split.unlabeled_indices.tolist()) | val == set(range(len(targets)))


def test_unlabeled_modes(targets: np.ndarray) -> None:
    rest = make_split(targets, C, SplitSpec(num_labels=40, val_size=20, unlabeled="rest"))
    assert set(rest.unlabeled_indices.tolist()).isdisjoint(rest.labeled_indices.tolist())
    assert set(rest.unlabeled_indices.tolist()).isdisjoint(rest.val_indices.tolist())
    assert len(rest.unlabeled_indices) == len(targets) - 40 - 20
    none = make_split(targets, C, SplitSpec(num_labels=40, unlabeled="none"))
    assert none.unlabeled_indices.size == 0
    with pytest.raises(ValueError, match="unlabeled"):
        SplitSpec(unlabeled="some")


def test_full_supervision_and_clustering(targets: np.ndarray) -> None:
    full = make_split(targets, C, SplitSpec(val_size=100))
    assert len(full.labeled_indices) == len(targets) - 100
    assert set(full.labeled_indices.tolist()).isdisjoint(full.val_indices.tolist())
    empty = make_split(targets, C, SplitSpec(num_labels=0))
    assert empty.labeled_indices.size == 0 and empty.labeled_targets.size == 0
    assert len(empty.unlabeled_indices) == len(targets)


def test_too_many_labels_for_a_class() -> None:
    targets = balanced_targets(10)
    with pytest.raises(ValueError, match="class 0 needs 8 labeled images but only 5 remain"):
        make_split(targets, C, SplitSpec(num_labels=80, val_size=50))


@pytest.mark.parametrize(
    ("rho", "expected", "total"),
    [
        (50, [1500, 971, 628, 407, 263, 170, 110, 71, 46, 30], 4196),
        (100, [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15], 3720),
    ],
)
def test_long_tail_counts(rho: float, expected: list[int], total: int) -> None:
    assert long_tail_counts(C, rho, 1500) == expected
    targets = np.repeat(np.arange(C), 5000).astype(np.int64)
    split = make_split(targets, C, SplitSpec(imbalance_ratio=rho, max_per_class=1500))
    assert class_counts(targets[split.labeled_indices]) == expected
    assert len(split.labeled_indices) == total
    # The unlabeled pool stays balanced: all 5000 images per class.
    assert class_counts(targets[split.unlabeled_indices]) == [5000] * C
    # num_labels may restate the sum but not contradict it.
    make_split(targets, C, SplitSpec(num_labels=total, imbalance_ratio=rho))
    with pytest.raises(ValueError, match="long-tailed"):
        make_split(targets, C, SplitSpec(num_labels=total + 10, imbalance_ratio=rho))


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_symmetric_noise_exact_rate(rate: float) -> None:
    targets = balanced_targets(500)
    split = make_split(targets, C, SplitSpec(num_labels=4000, noise_rate=rate, split_seed=2))
    clean, noisy = split.clean_labeled_targets, split.labeled_targets
    np.testing.assert_array_equal(clean, targets[split.labeled_indices])
    flipped = noisy != clean
    assert flipped.sum() == round(rate * 4000)
    assert noisy.min() >= 0 and noisy.max() < C
    # The same labeled images are chosen as without noise: noise only rewrites their labels.
    no_noise = make_split(targets, C, SplitSpec(num_labels=4000, split_seed=2))
    np.testing.assert_array_equal(split.labeled_indices, no_noise.labeled_indices)
    # Every other class is reachable as a noisy label.
    assert len(set(zip(clean[flipped].tolist(), noisy[flipped].tolist(), strict=True))) == C * (C - 1)


def test_noise_rate_validated() -> None:
    with pytest.raises(ValueError, match="noise_rate"):
        SplitSpec(num_labels=40, noise_rate=1.0)
    with pytest.raises(ValueError, match="noise_rate"):
        SplitSpec(num_labels=40, noise_rate=-0.1)


def test_label_fraction() -> None:
    targets = balanced_targets(500)
    split = make_split(targets, C, SplitSpec(label_fraction=0.01))
    assert class_counts(targets[split.labeled_indices]) == [5] * C
    split = make_split(targets, C, SplitSpec(label_fraction=0.1, val_size=1000))
    # A fraction of each class's pool after the validation carve: 0.1 * 400.
    assert class_counts(targets[split.labeled_indices]) == [40] * C
    with pytest.raises(ValueError, match="mutually exclusive"):
        SplitSpec(num_labels=40, label_fraction=0.1)


def test_fixed_indices(targets: np.ndarray) -> None:
    chosen = [int(np.flatnonzero(targets == c)[0]) for c in range(C)]
    split = make_split(targets, C, SplitSpec(fixed_indices=list(reversed(chosen)), val_size=100))  # type: ignore[arg-type]
    np.testing.assert_array_equal(split.labeled_indices, sorted(chosen))
    assert class_counts(targets[split.labeled_indices]) == [1] * C
    assert set(split.val_indices.tolist()).isdisjoint(chosen)
    assert class_counts(targets[split.val_indices]) == [10] * C
    with pytest.raises(ValueError, match="out of range"):
        make_split(targets, C, SplitSpec(fixed_indices=(len(targets),)))
    with pytest.raises(ValueError, match="num_labels"):
        SplitSpec(num_labels=40, fixed_indices=tuple(chosen))
    name = split_filename("cifar10", SplitSpec(fixed_indices=tuple(chosen)))
    other = split_filename("cifar10", SplitSpec(fixed_indices=tuple(chosen[:-1])))
    assert name.startswith("cifar10_fixed10_seed0_") and name != other


def test_unlabeled_only_targets_never_labeled() -> None:
    # STL-10 style: labeled train images followed by images with target -1.
    targets = np.concatenate([balanced_targets(20), np.full(300, -1, dtype=np.int64)])
    for spec in (
        SplitSpec(num_labels=100, val_size=50),
        SplitSpec(val_size=50),
        SplitSpec(label_fraction=0.5),
    ):
        split = make_split(targets, C, spec)
        assert (targets[split.labeled_indices] >= 0).all()
        assert (targets[split.val_indices] >= 0).all()
        assert set(np.flatnonzero(targets == -1).tolist()) <= set(split.unlabeled_indices.tolist())
    full = make_split(targets, C, SplitSpec())
    assert len(full.labeled_indices) == 200
    with pytest.raises(ValueError, match="target -1"):
        make_split(targets, C, SplitSpec(fixed_indices=(250,)))


def test_filenames() -> None:
    assert split_filename("cifar10", SplitSpec(num_labels=40)) == "cifar10_n40_seed0.json"
    lt = SplitSpec(imbalance_ratio=50, noise_rate=0.2, val_size=5000, split_seed=1)
    assert split_filename("cifar10", lt) == "cifar10_n1500lt50_noise0.2_val5000_seed1.json"
    assert split_filename("stl10", SplitSpec(label_fraction=0.1)) == "stl10_frac0.1_seed0.json"
    assert split_filename("digits", SplitSpec(unlabeled="rest")) == "digits_full_ulbrest_seed0.json"
    with pytest.raises(ValueError):
        split_filename("../x", SplitSpec())


def test_file_reuse(tmp_path: Path) -> None:
    targets = balanced_targets(100)
    spec = SplitSpec(num_labels=40, noise_rate=0.2, val_size=100, split_seed=5)
    first = load_or_create_split(targets, C, spec, tmp_path / "splits", "toy")
    assert first.path == tmp_path / "splits" / "toy_n40_noise0.2_val100_seed5.json"
    assert first.path is not None and first.path.exists()
    payload = json.loads(first.path.read_text())
    assert payload["sha256"] == first.sha256
    assert payload["unlabeled_indices"] == "all"
    assert payload["num_train"] == len(targets)
    # The sha256 of an in-memory draw matches the file when the dataset name is the same.
    assert make_split(targets, C, spec, dataset="toy").sha256 == first.sha256

    content, mtime = first.path.read_bytes(), first.path.stat().st_mtime_ns
    second = load_or_create_split(targets, C, spec, tmp_path / "splits", "toy")
    assert first.path.read_bytes() == content and first.path.stat().st_mtime_ns == mtime
    assert second.sha256 == first.sha256
    for field in (
        "labeled_indices",
        "labeled_targets",
        "clean_labeled_targets",
        "unlabeled_indices",
        "val_indices",
    ):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))
    assert not list((tmp_path / "splits").glob("*.tmp"))


def test_rest_mode_round_trip(tmp_path: Path) -> None:
    targets = balanced_targets(50)
    spec = SplitSpec(num_labels=20, val_size=10, unlabeled="rest")
    first = load_or_create_split(targets, C, spec, tmp_path, "toy")
    second = load_or_create_split(targets, C, spec, tmp_path, "toy")
    np.testing.assert_array_equal(first.unlabeled_indices, second.unlabeled_indices)
    assert len(second.unlabeled_indices) == len(targets) - 30


def _write_payload(path: Path, payload: dict) -> None:
    path.write_text(canonical_json(payload))


def test_tampered_file_rejected(tmp_path: Path) -> None:
    targets = balanced_targets(50)
    spec = SplitSpec(num_labels=20)
    split = load_or_create_split(targets, C, spec, tmp_path, "toy")
    assert split.path is not None
    payload = json.loads(split.path.read_text())
    payload["labeled_indices"][0] += 1
    _write_payload(split.path, payload)
    with pytest.raises(SplitFileError, match="edited or corrupted"):
        load_or_create_split(targets, C, spec, tmp_path, "toy")
    split.path.write_text("{not json")
    with pytest.raises(SplitFileError, match="delete"):
        load_or_create_split(targets, C, spec, tmp_path, "toy")


def test_spec_mismatch_rejected(tmp_path: Path) -> None:
    targets = balanced_targets(50)
    spec = SplitSpec(num_labels=20)
    split = load_or_create_split(targets, C, spec, tmp_path, "toy")
    assert split.path is not None
    # A file whose sha256 is intact but that was written for a different protocol under this name.
    payload = json.loads(split.path.read_text())
    payload["spec"]["noise_rate"] = 0.5
    payload["sha256"] = payload_sha256(payload)
    _write_payload(split.path, payload)
    with pytest.raises(SplitFileError, match="written for"):
        load_or_create_split(targets, C, spec, tmp_path, "toy")


def test_dataset_change_rejected(tmp_path: Path) -> None:
    targets = balanced_targets(50)
    spec = SplitSpec(num_labels=20)
    split = load_or_create_split(targets, C, spec, tmp_path, "toy")
    with pytest.raises(SplitFileError, match="dataset changed"):
        load_or_create_split(targets[:-1], C, spec, tmp_path, "toy")
    relabelled = targets.copy()
    relabelled[split.labeled_indices[0]] = (relabelled[split.labeled_indices[0]] + 1) % C
    with pytest.raises(SplitFileError, match="dataset changed"):
        load_or_create_split(relabelled, C, spec, tmp_path, "toy")


def test_split_is_frozen(targets: np.ndarray) -> None:
    split: Split = make_split(targets, C, SplitSpec(num_labels=10))
    with pytest.raises(AttributeError):
        split.sha256 = "x"  # type: ignore[misc]
