"""Label protocols: which training images are labeled, unlabeled or held out for validation.

A split is drawn once from the training targets with its own ``split_seed`` (independent of the
training seed, so several training seeds can share one labeled set), written to a JSON index file and
reused whenever the file is present. The file records its sha256 so a run can report exactly which
split it used (``split_sha256`` in ``results.json``) and so hand edits or corruption are detected.

Sampling order (all draws from one ``np.random.default_rng(split_seed)``):

1. Per class ``c = 0..C-1``, in that order, the indices of class ``c`` (ascending) are permuted once.
   The first ``val_size // C`` go to validation and the next ``n_c`` are labeled. Drawing both from one
   permutation keeps the pools disjoint and makes labeled sets nested: at a fixed seed and ``val_size``
   the 40-label set is a subset of the 250-label set.
2. Symmetric noise: exactly ``round(r * n_l)`` labeled positions (round half up) are chosen uniformly
   without replacement and each is relabeled to a class drawn uniformly from the ``C - 1`` *other*
   classes, so the realised noise rate is exactly ``r`` (bhattacharyya.md §5.5).

Images with target ``-1`` (STL-10 ``unlabeled``) are never labeled or validation images; they belong to
the unlabeled pool. With ``fixed_indices`` the labeled set is given; validation images are then drawn
from the remaining images of each class.

File format (``format: 1``): one canonical JSON object (sorted keys, no whitespace) with keys
``format``, ``dataset``, ``spec``, ``num_train``, ``labeled_indices``, ``labeled_targets`` (what the model
sees, noisy when ``noise_rate > 0``), ``clean_labeled_targets``, ``unlabeled_indices``, ``val_indices`` and
``sha256``, the hex sha256 of the canonical JSON of every other key. Index lists are sorted ascending.
To keep files small, ``unlabeled_indices`` is stored implicitly as a string when it is derivable:
``"all"`` means every index in ``range(num_train)`` not in ``val_indices``; ``"rest"`` additionally
excludes ``labeled_indices``. ``unlabeled: "none"`` stores ``[]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
UNLABELED_MODES = ("all", "rest", "none")


class SplitFileError(RuntimeError):
    """A split file on disk cannot be reused for the requested spec and dataset."""


@dataclass(frozen=True)
class SplitSpec:
    """What to label. See the module docstring for how each field is sampled.

    Exactly one way of choosing labels applies: ``fixed_indices``, ``imbalance_ratio`` (long tail),
    ``label_fraction`` or ``num_labels``; with none of them every pool image with a target is labeled.
    """

    num_labels: int | None = None
    label_fraction: float | None = None
    imbalance_ratio: float | None = None
    max_per_class: int = 1500
    noise_rate: float = 0.0
    val_size: int = 0
    unlabeled: str = "all"
    split_seed: int = 0
    fixed_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise types so that equal protocols give equal JSON (50 vs 50.0 would change the sha256) and
        # a list from a YAML config still yields a hashable spec. operator.index refuses 2.5 for a count
        # instead of silently truncating it.
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.num_labels is not None:
            set_("num_labels", operator.index(self.num_labels))
        if self.label_fraction is not None:
            set_("label_fraction", float(self.label_fraction))
        if self.imbalance_ratio is not None:
            set_("imbalance_ratio", float(self.imbalance_ratio))
        set_("max_per_class", operator.index(self.max_per_class))
        set_("noise_rate", float(self.noise_rate))
        set_("val_size", operator.index(self.val_size))
        set_("split_seed", operator.index(self.split_seed))
        if self.fixed_indices is not None:
            set_("fixed_indices", tuple(operator.index(i) for i in self.fixed_indices))

        if self.num_labels is not None and self.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0 or None, got {self.num_labels}")
        if self.label_fraction is not None:
            if self.num_labels is not None:
                raise ValueError("num_labels and label_fraction are mutually exclusive; set only one")
            if not 0.0 < self.label_fraction <= 1.0:
                raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.imbalance_ratio is not None:
            if self.imbalance_ratio < 1.0:
                raise ValueError(f"imbalance_ratio (rho) must be >= 1, got {self.imbalance_ratio}")
            if self.label_fraction is not None:
                raise ValueError("imbalance_ratio and label_fraction are mutually exclusive")
        if self.max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {self.max_per_class}")
        if not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"noise_rate must be in [0, 1), got {self.noise_rate}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.unlabeled not in UNLABELED_MODES:
            raise ValueError(f"unlabeled must be one of {UNLABELED_MODES}, got {self.unlabeled!r}")
        if self.split_seed < 0:
            raise ValueError(f"split_seed must be >= 0 (numpy seeds are non-negative), got {self.split_seed}")
        if self.fixed_indices is not None:
            if self.label_fraction is not None or self.imbalance_ratio is not None:
                raise ValueError("fixed_indices cannot be combined with label_fraction or imbalance_ratio")
            if self.num_labels is not None and self.num_labels != len(self.fixed_indices):
                raise ValueError(
                    f"num_labels={self.num_labels} but fixed_indices has {len(self.fixed_indices)} entries; "
                    "leave num_labels unset or make them agree"
                )
            if len(set(self.fixed_indices)) != len(self.fixed_indices):
                raise ValueError("fixed_indices contains duplicates")

    def to_json_dict(self) -> dict[str, Any]:
        """The spec as plain JSON types (tuples become lists), as stored in the split file."""
        data = dataclasses.asdict(self)
        if data["fixed_indices"] is not None:
            data["fixed_indices"] = list(data["fixed_indices"])
        return data


@dataclass(frozen=True, eq=False)
class Split:
    """A drawn split. ``eq=False`` because element-wise array comparison has no single truth value."""

    labeled_indices: np.ndarray
    labeled_targets: np.ndarray
    clean_labeled_targets: np.ndarray
    unlabeled_indices: np.ndarray
    val_indices: np.ndarray
    sha256: str
    path: Path | None


def long_tail_counts(num_classes: int, imbalance_ratio: float, max_per_class: int = 1500) -> list[int]:
    """Per-class labeled counts ``N_c = floor(N1 * rho^(-c/(C-1)))``, ``N_{C-1} = floor(N1 / rho)``, head = 0."""
    if num_classes < 2:
        raise ValueError(f"a long-tailed split needs at least 2 classes, got {num_classes}")
    counts = []
    for c in range(num_classes):
        if c == num_classes - 1:
            value = max_per_class / imbalance_ratio
        else:
            value = max_per_class * imbalance_ratio ** (-c / (num_classes - 1))
        # The epsilon only absorbs floating-point error when the exact value is an integer (e.g. 149.99999...
        # for 150); it is far below any genuine fractional part.
        counts.append(math.floor(value + 1e-9))
    return counts


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the byte-stable form that the sha256 is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def payload_sha256(payload: dict[str, Any]) -> str:
    body = {k: v for k, v in payload.items() if k != "sha256"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def _check_targets(targets: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(f"targets must be 1-D, got shape {targets.shape}")
    if targets.size and not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integers, got dtype {targets.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    targets = targets.astype(np.int64, copy=False)
    bad = (targets < -1) | (targets >= num_classes)
    if bad.any():
        raise ValueError(
            f"targets must lie in [-1, {num_classes}) (-1 = image without a label); "
            f"found {np.unique(targets[bad]).tolist()[:10]}"
        )
    return targets


def _per_class_split(num_classes: int, spec: SplitSpec) -> tuple[int, int | None]:
    """(validation images per class, labeled images per class or None when the count varies by class)."""
    if spec.val_size % num_classes:
        raise ValueError(
            f"val_size={spec.val_size} is not divisible by num_classes={num_classes}; the validation split is "
            f"class-balanced, so use a multiple of {num_classes}"
        )
    per_class = None
    if spec.imbalance_ratio is None and spec.label_fraction is None and spec.num_labels is not None:
        if spec.fixed_indices is None and spec.num_labels % num_classes:
            raise ValueError(
                f"num_labels={spec.num_labels} is not divisible by num_classes={num_classes}; labeled sets are "
                f"class-balanced (num_labels // C per class), so use a multiple of {num_classes}"
            )
        per_class = spec.num_labels // num_classes
    return spec.val_size // num_classes, per_class


def make_split(
    targets: np.ndarray, num_classes: int, spec: SplitSpec, *, dataset: str | None = None
) -> Split:
    """Draw the split for ``spec``; pure and deterministic in ``spec.split_seed``.

    ``dataset`` only enters the sha256 (the file payload names its dataset); ``load_or_create_split``
    passes it so that the returned sha256 equals the file's. ``path`` is None here.
    """
    targets = _check_targets(targets, num_classes)
    payload = _draw_payload(targets, num_classes, spec, dataset)
    return _split_from_payload(payload, path=None)


def _draw_payload(
    targets: np.ndarray, num_classes: int, spec: SplitSpec, dataset: str | None
) -> dict[str, Any]:
    n = len(targets)
    rng = np.random.default_rng(spec.split_seed)
    val_per_class, labels_per_class = _per_class_split(num_classes, spec)

    fixed: np.ndarray | None = None
    if spec.fixed_indices is not None:
        fixed = np.asarray(spec.fixed_indices, dtype=np.int64)
        out_of_range = fixed[(fixed < 0) | (fixed >= n)]
        if out_of_range.size:
            raise ValueError(f"fixed_indices out of range [0, {n}): {out_of_range.tolist()[:10]}")
        unlabeled_fixed = fixed[targets[fixed] < 0]
        if unlabeled_fixed.size:
            raise ValueError(
                f"fixed_indices point at images without a label (target -1): {unlabeled_fixed.tolist()[:10]}"
            )

    lt_counts = None
    if spec.imbalance_ratio is not None:
        lt_counts = long_tail_counts(num_classes, spec.imbalance_ratio, spec.max_per_class)
        if spec.num_labels is not None and spec.num_labels != sum(lt_counts):
            raise ValueError(
                f"num_labels={spec.num_labels} disagrees with the long-tailed counts {lt_counts} "
                f"(sum {sum(lt_counts)}) given by max_per_class={spec.max_per_class} and "
                f"imbalance_ratio={spec.imbalance_ratio:g}; leave num_labels unset"
            )

    val_parts: list[np.ndarray] = []
    labeled_parts: list[np.ndarray] = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if fixed is not None:
            # A supplied labeled image must not be carved out as validation, so val draws around it.
            members = np.setdiff1d(members, fixed, assume_unique=True)
        perm = rng.permutation(members)
        if val_per_class > len(perm):
            raise ValueError(
                f"class {c} has {len(perm)} images available for validation but val_size={spec.val_size} "
                f"asks for {val_per_class} per class"
            )
        val_parts.append(perm[:val_per_class])
        remaining = perm[val_per_class:]
        if fixed is not None:
            continue
        if lt_counts is not None:
            want = lt_counts[c]
        elif spec.label_fraction is not None:
            # Fraction of the class's pool (after the validation carve), rounded half up.
            want = math.floor(spec.label_fraction * len(remaining) + 0.5)
        elif labels_per_class is not None:
            want = labels_per_class
        else:
            want = len(remaining)
        if want > len(remaining):
            raise ValueError(
                f"class {c} needs {want} labeled images but only {len(remaining)} remain in the pool "
                f"(after {val_per_class} per class for validation); lower num_labels / max_per_class / "
                "val_size"
            )
        labeled_parts.append(remaining[:want])

    val = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, np.int64)
    if fixed is not None:
        labeled = np.sort(fixed)
    else:
        labeled = np.sort(np.concatenate(labeled_parts)) if labeled_parts else np.empty(0, np.int64)
    clean = targets[labeled]

    noisy = clean.copy()
    if spec.noise_rate > 0.0 and labeled.size:
        if num_classes < 2:
            raise ValueError("symmetric label noise needs at least 2 classes")
        num_flipped = math.floor(spec.noise_rate * len(labeled) + 0.5)
        flipped = rng.choice(len(labeled), size=num_flipped, replace=False)
        # Adding an offset in [1, C) mod C is a uniform draw over the C-1 other classes.
        offsets = rng.integers(1, num_classes, size=num_flipped)
        noisy[flipped] = (clean[flipped] + offsets) % num_classes

    unlabeled_field: str | list[int] = [] if spec.unlabeled == "none" else spec.unlabeled
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "spec": spec.to_json_dict(),
        "num_train": n,
        "labeled_indices": labeled.tolist(),
        "labeled_targets": noisy.tolist(),
        "clean_labeled_targets": clean.tolist(),
        "unlabeled_indices": unlabeled_field,
        "val_indices": val.tolist(),
    }
    payload["sha256"] = payload_sha256(payload)
    return payload


def _index_array(values: Any, name: str) -> np.ndarray:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise SplitFileError(f"split file field {name!r} must be a list of integers")
    return np.asarray(values, dtype=np.int64)


def _split_from_payload(payload: dict[str, Any], path: Path | None) -> Split:
    n = payload["num_train"]
    labeled = _index_array(payload["labeled_indices"], "labeled_indices")
    val = _index_array(payload["val_indices"], "val_indices")
    field = payload["unlabeled_indices"]
    if field == "all":
        unlabeled = np.setdiff1d(np.arange(n, dtype=np.int64), val, assume_unique=True)
    elif field == "rest":
        unlabeled = np.setdiff1d(np.arange(n, dtype=np.int64), np.union1d(val, labeled), assume_unique=True)
    else:
        unlabeled = _index_array(field, "unlabeled_indices")
    return Split(
        labeled_indices=labeled,
        labeled_targets=_index_array(payload["labeled_targets"], "labeled_targets"),
        clean_labeled_targets=_index_array(payload["clean_labeled_targets"], "clean_labeled_targets"),
        unlabeled_indices=unlabeled,
        val_indices=val,
        sha256=payload["sha256"],
        path=path,
    )


def _format_number(x: float) -> str:
    # repr is the shortest string that round-trips, so distinct rates never share a file name; integral
    # floats drop the ".0" to keep names such as "lt50" readable.
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def split_filename(dataset: str, spec: SplitSpec) -> str:
    """A readable file name, unique per spec: e.g. ``cifar10_n40_seed0.json``.

    Fields that the readable part cannot show (fixed indices, a non-default ``max_per_class`` outside the
    long tail, an explicit ``num_labels`` alongside the long tail) add an 8-hex-digit hash of the spec.
    """
    if not dataset or any(ch in dataset for ch in "/\\") or dataset.startswith("."):
        raise ValueError(f"dataset name {dataset!r} is not usable in a file name")
    default_max = SplitSpec.__dataclass_fields__["max_per_class"].default
    parts = [dataset]
    needs_hash = False
    if spec.fixed_indices is not None:
        parts.append(f"fixed{len(spec.fixed_indices)}")
        needs_hash = True
    elif spec.imbalance_ratio is not None:
        parts.append(f"n{spec.max_per_class}lt{_format_number(spec.imbalance_ratio)}")
        needs_hash = spec.num_labels is not None
    elif spec.label_fraction is not None:
        parts.append(f"frac{_format_number(spec.label_fraction)}")
    elif spec.num_labels is not None:
        parts.append(f"n{spec.num_labels}")
    else:
        parts.append("full")
    if spec.imbalance_ratio is None and spec.max_per_class != default_max:
        needs_hash = True
    if spec.noise_rate > 0:
        parts.append(f"noise{_format_number(spec.noise_rate)}")
    if spec.val_size > 0:
        parts.append(f"val{spec.val_size}")
    if spec.unlabeled != "all":
        parts.append(f"ulb{spec.unlabeled}")
    parts.append(f"seed{spec.split_seed}")
    if needs_hash:
        parts.append(hashlib.sha256(canonical_json(spec.to_json_dict()).encode("ascii")).hexdigest()[:8])
    return "_".join(parts) + ".json"


def _load(path: Path, targets: np.ndarray, spec: SplitSpec, dataset: str) -> Split:
    delete_hint = f"delete {path} to regenerate it"
    try:
        payload = json.loads(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SplitFileError(f"split file {path} is unreadable or corrupted ({err}); {delete_hint}") from err
    if not isinstance(payload, dict) or "sha256" not in payload:
        raise SplitFileError(f"split file {path} is not a split file (no sha256 field); {delete_hint}")
    if payload.get("format") != FORMAT_VERSION:
        raise SplitFileError(
            f"split file {path} has format {payload.get('format')!r}, expected {FORMAT_VERSION}; {delete_hint}"
        )
    if payload_sha256(payload) != payload["sha256"]:
        raise SplitFileError(
            f"split file {path} fails its sha256 check: it was edited or corrupted; {delete_hint}"
        )
    if payload.get("dataset") != dataset or payload.get("spec") != spec.to_json_dict():
        raise SplitFileError(
            f"split file {path} was written for dataset {payload.get('dataset')!r} with spec "
            f"{payload.get('spec')}, not for {dataset!r} with {spec.to_json_dict()}; {delete_hint} "
            "(or move it aside if it belongs to another experiment)"
        )
    if payload.get("num_train") != len(targets):
        raise SplitFileError(
            f"split file {path} was drawn from {payload.get('num_train')} training images but the dataset now "
            f"has {len(targets)}: the dataset changed, so its indices are meaningless; {delete_hint}"
        )
    try:
        split = _split_from_payload(payload, path=path)
    except (KeyError, TypeError, ValueError) as err:
        raise SplitFileError(f"split file {path} is malformed ({err!r}); {delete_hint}") from err
    n = len(targets)
    for name in ("labeled_indices", "unlabeled_indices", "val_indices"):
        indices = getattr(split, name)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise SplitFileError(f"split file {path}: {name} out of range [0, {n}); {delete_hint}")
    if len(split.clean_labeled_targets) != len(split.labeled_indices) or len(split.labeled_targets) != len(
        split.labeled_indices
    ):
        raise SplitFileError(
            f"split file {path}: label lists and labeled_indices differ in length; {delete_hint}"
        )
    if not np.array_equal(split.clean_labeled_targets, targets[split.labeled_indices]):
        raise SplitFileError(
            f"split file {path} stores clean labels that differ from the dataset's targets at its labeled "
            f"indices: the dataset changed (order or labels) since the split was drawn; {delete_hint}"
        )
    return split


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file,
    and concurrent writers of the same deterministic content simply replace each other's copy."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create_split(
    targets: np.ndarray, num_classes: int, spec: SplitSpec, directory: Path, dataset: str
) -> Split:
    """Reuse ``directory / split_filename(dataset, spec)`` after verifying it, else draw and write it."""
    targets = _check_targets(targets, num_classes)
    directory = Path(directory)
    path = directory / split_filename(dataset, spec)
    if path.exists():
        return _load(path, targets, spec, dataset)
    directory.mkdir(parents=True, exist_ok=True)
    payload = _draw_payload(targets, num_classes, spec, dataset)
    write_bytes_atomic(path, (canonical_json(payload) + "\n").encode("ascii"))
    return _split_from_payload(payload, path=path)
