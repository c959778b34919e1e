"""Class-activation maps, boxes, IoU and split-level metrics for InfoCAM and PC-softmax (specs/infocam.md §3.3–§3.5).

Pipeline of one eval batch (all maps in fp32 or better, outside autocast):

    activation_maps → region_sum → upsample_normalize → extract_boxes → box_iou → LocalizationMetrics

`localization_ious` runs the whole chain for a grid of variants × region sizes × thresholds and returns
per-image IoUs; `LocalizationMetrics` accumulates hits as sum states (hits / N over the whole split,
never running averages: bug B3). `ClassBalanceMetrics` holds the logit-only metrics of the PC-softmax
experiments (per-class accuracies and the MI estimates of §3.2); it lives here because the same
LightningModule evaluates both.

Conventions: a box is [x1, y1, x2, y2] in continuous pixel coordinates, pixel (r, c) covering
[c, c+1) × [r, r+1). "No box" (empty mask) is returned as an all-zero box with `has_box = False`; its IoU
is 0 by definition (`box_iou(..., pred_valid=has_box)`), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple, get_args

import numba
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from ssl_lightning.losses.pc_softmax import TrainedWith, mi_from_sums, mi_terms

__all__ = [
    "BoxMode",
    "Boxes",
    "ClassBalanceMetrics",
    "IoUConvention",
    "LocalizationMetrics",
    "MAP_VARIANTS",
    "MapVariant",
    "RegionPadding",
    "TAU_SWEEP",
    "activation_maps",
    "box_iou",
    "extract_boxes",
    "extract_boxes_reference",
    "localization_ious",
    "region_sum",
    "topk_correct",
    "upsample_normalize",
    "variant_key",
]

MapVariant = Literal["cam", "mean_others", "least_likely"]
RegionPadding = Literal["full", "same"]
BoxMode = Literal["largest", "all_foreground"]
IoUConvention = Literal["continuous", "inclusive_pixels"]

MAP_VARIANTS: tuple[str, ...] = get_args(MapVariant)
# The τ-sweep of spec §3.5 (reference `cam_curve`): 0.00, 0.05, …, 0.95.
TAU_SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))
# Relative tolerance under which an upsampled map counts as constant (spec §3.3, bug B11).
CONSTANT_MAP_RTOL = 1e-12


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


# ------------------------------------------------------------------------------------------------ maps


def activation_maps(
    features: Tensor, weight: Tensor, logits: Tensor, targets: Tensor, variant: MapVariant
) -> Tensor:
    """Raw class-activation maps A(i, j) = Σ_c V_c F_c(i, j) for the ground-truth class y (spec §3.3).

    | variant        | V                                   |
    |----------------|-------------------------------------|
    | `cam`          | W_y                                 |
    | `mean_others`  | W_y − mean_{k≠y} W_k   (infoCAM)    |
    | `least_likely` | W_y − W_{k*}, k* = argmin_k f_k     |

    No bias and no ReLU: differences of logits are differences of PMI, which decompose spatially.
    `least_likely` uses argmin (bug B6); when y is itself the least likely class V = 0 and the map is
    constant (it becomes an empty mask after `upsample_normalize`).

    Args:
        features: (B, C, h, w) last conv map F (post-ReLU).
        weight: (K, C) classifier weight W.
        logits: (B, K) logits f (only `least_likely` reads them).
        targets: (B,) ground-truth labels y.
        variant: one of `cam`, `mean_others`, `least_likely`.

    Returns:
        (B, h, w) maps in fp32 (fp64 if the features are fp64).
    """
    _check_choice("variant", variant, MAP_VARIANTS)
    if features.ndim != 4 or weight.ndim != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features must be (B, C, h, w) and weight (K, C); got {tuple(features.shape)} and "
            f"{tuple(weight.shape)}"
        )
    num_classes = weight.shape[0]
    if variant != "cam" and num_classes < 2:
        raise ValueError(f"variant {variant!r} needs at least 2 classes")
    feats = _at_least_fp32(features)
    w = weight.to(feats.dtype)
    y = targets.long().to(w.device)
    v = w[y]
    if variant == "mean_others":
        v = v - (w.sum(dim=0, keepdim=True) - v) / (num_classes - 1)
    elif variant == "least_likely":
        v = v - w[logits.argmin(dim=1).to(w.device)]
    return torch.einsum("bc,bchw->bhw", v, feats)


def region_sum(maps: Tensor, k: int, padding: RegionPadding = "full") -> Tensor:
    """Sum of the map over every k×k window (an all-ones k×k convolution; reference `--conv-cams`).

    `full`: R(u, v) = Σ_{i=u−k+1..u} Σ_{j=v−k+1..v} A(i, j) with A = 0 outside, size (h+k−1, w+k−1).
    `same`: pad ⌊(k−1)/2⌋ before and ⌈(k−1)/2⌉ after, size (h, w). k = 1 is the identity.

    Args:
        maps: (B, h, w).
    """
    _check_choice("padding", padding, get_args(RegionPadding))
    if k < 1:
        raise ValueError(f"region size k must be >= 1, got {k}")
    if k == 1:
        return maps
    before, after = (k - 1, k - 1) if padding == "full" else ((k - 1) // 2, k - 1 - (k - 1) // 2)
    padded = F.pad(maps[:, None], (before, after, before, after))
    ones = torch.ones(1, 1, k, k, dtype=maps.dtype, device=maps.device)
    return F.conv2d(padded, ones)[:, 0]


def upsample_normalize(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bicubic resize (align_corners=False) to `size`, then per-image min–max to [0, 1] (spec §3.3).

    The min–max comes after resizing so that bicubic overshoot is absorbed. Computed in float64 so a
    constant map stays constant through the resize; a map whose range is ≤ 1e-12·(1 + |max|) becomes
    all zeros (an empty mask, counted as a miss) instead of NaN (bug B11).

    Args:
        maps: (B, h, w).
        size: output side S or (H, W).

    Returns:
        (B, H, W) float32 in [0, 1].
    """
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(maps.double()[:, None], size=out_size, mode="bicubic", align_corners=False)[:, 0]
    flat = up.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    hi = flat.amax(dim=1)[:, None, None]
    span = hi - lo
    constant = span <= CONSTANT_MAP_RTOL * (1.0 + hi.abs())
    normalized = (up - lo) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, torch.zeros_like(normalized), normalized).float()


# ----------------------------------------------------------------------------------------------- boxes


class Boxes(NamedTuple):
    """Predicted boxes and whether a box exists (the mask was non-empty).

    `boxes` is (..., 4) float32 [x1, y1, x2, y2]; rows without a box are all zero.
    """

    boxes: Tensor
    has_box: Tensor


@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _largest_component_boxes(
    maps: np.ndarray, thresholds_desc: np.ndarray, out_boxes: np.ndarray, out_has: np.ndarray
) -> None:
    """Largest 8-connected component of {m > τ} for every τ, in one union-find pass per image.

    The masks are nested (they grow as τ falls), so pixels are added in order of the highest threshold
    they exceed and components are merged as they appear; the order inside one threshold interval does
    not matter, since only the components at each threshold are read (a stable counting sort keeps it
    raster order, which is cache-friendly). The largest component (ties: the one containing the first
    foreground pixel in raster order, which is scipy's labelling order) is kept incrementally: only a
    component that was just created or merged can overtake it, and a merged one always outgrows it.
    """
    n_img, height, width = maps.shape
    n_thr = thresholds_desc.shape[0]
    n = height * width
    parent = np.empty(n, np.int32)
    size = np.empty(n, np.int32)
    first = np.empty(n, np.int32)
    r_lo = np.empty(n, np.int32)
    r_hi = np.empty(n, np.int32)
    c_lo = np.empty(n, np.int32)
    c_hi = np.empty(n, np.int32)
    bucket = np.empty(n, np.int32)
    order = np.empty(n, np.int32)
    starts = np.empty(n_thr + 2, np.int64)
    for b in range(n_img):
        # Bucket j: the largest threshold the pixel exceeds is thresholds_desc[j]; j = n_thr: none
        # (NaN pixels land there too, since every comparison with NaN is false).
        starts[:] = 0
        p = 0
        for r in range(height):
            for c in range(width):
                v = maps[b, r, c]
                j = 0
                while j < n_thr and not (v > thresholds_desc[j]):
                    j += 1
                bucket[p] = j
                starts[j + 1] += 1
                p += 1
        for j in range(n_thr + 1):
            starts[j + 1] += starts[j]
        fill = starts.copy()
        for p in range(n):
            order[fill[bucket[p]]] = p
            fill[bucket[p]] += 1

        parent[:] = -1
        best = -1
        best_size = 0
        best_first = n
        for j in range(n_thr):
            for idx in range(starts[j], starts[j + 1]):
                p = order[idx]
                r = p // width
                c = p - r * width
                parent[p] = p
                size[p] = 1
                first[p] = p
                r_lo[p] = r
                r_hi[p] = r
                c_lo[p] = c
                c_hi[p] = c
                root = p
                for rr in range(max(r - 1, 0), min(r + 2, height)):
                    for cc in range(max(c - 1, 0), min(c + 2, width)):
                        q = rr * width + cc
                        link = parent[q]
                        # Inactive, or already a direct child of (or equal to) the current root.
                        if link < 0 or link == root or q == root:
                            continue
                        other = _find(parent, q)
                        if other == root:
                            continue
                        # Union by size; the surviving root takes the merged statistics.
                        if size[other] > size[root]:
                            root, other = other, root
                        parent[other] = root
                        size[root] += size[other]
                        first[root] = min(first[root], first[other])
                        r_lo[root] = min(r_lo[root], r_lo[other])
                        r_hi[root] = max(r_hi[root], r_hi[other])
                        c_lo[root] = min(c_lo[root], c_lo[other])
                        c_hi[root] = max(c_hi[root], c_hi[other])
                if size[root] > best_size or (size[root] == best_size and first[root] < best_first):
                    best = root
                    best_size = size[root]
                    best_first = first[root]
            if best >= 0:
                root = _find(parent, best)
                out_boxes[b, j, 0] = c_lo[root]
                out_boxes[b, j, 1] = r_lo[root]
                out_boxes[b, j, 2] = c_hi[root] + 1
                out_boxes[b, j, 3] = r_hi[root] + 1
                out_has[b, j] = True


def _thresholds_array(thresholds: float | Sequence[float]) -> tuple[np.ndarray, bool]:
    scalar = isinstance(thresholds, (int, float))
    values = np.asarray([thresholds] if scalar else list(thresholds), dtype=np.float32)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("thresholds must be a float or a non-empty sequence of floats")
    if not np.isfinite(values).all():
        raise ValueError(f"thresholds must be finite, got {values.tolist()}")
    return values, scalar


def _as_map_array(maps: Tensor) -> np.ndarray:
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    # Thresholds are compared in float32, like the maps (a float64 τ would disagree at τ itself).
    return np.ascontiguousarray(maps.detach().to("cpu", torch.float32).numpy())


def extract_boxes(
    maps: Tensor,
    thresholds: float | Sequence[float],
    mode: BoxMode = "largest",
    num_threads: int = 1,
) -> Boxes:
    """Boxes around the mask {M̂ > τ} of normalised maps, for one threshold or a whole τ-sweep (spec §3.4).

    `largest`: the largest 8-connected component (ties go to the component containing the first
    foreground pixel in raster order); `all_foreground`: the box of the whole mask. Box =
    [c_min, r_min, c_max + 1, r_max + 1]; an empty mask gives no box. The result equals
    `extract_boxes_reference` (scipy.ndimage.label per threshold) but all thresholds are answered by a
    single union-find pass per image, compiled with numba and releasing the GIL, so `num_threads > 1`
    runs chunks of the batch in parallel threads.

    Args:
        maps: (B, H, W) normalised maps (any device; copied to CPU float32).
        thresholds: a float τ, or a sequence of T thresholds (the τ-sweep).
        mode: `largest` or `all_foreground`.
        num_threads: worker threads for `largest` (1 runs inline).

    Returns:
        `Boxes(boxes, has_box)`: (B, 4) and (B,) for a float τ; (B, T, 4) and (B, T) for a sequence.
    """
    _check_choice("mode", mode, get_args(BoxMode))
    values, scalar = _thresholds_array(thresholds)
    arr = _as_map_array(maps)
    n_img, height, width = arr.shape
    if mode == "all_foreground":
        # The mask's rows (columns) are those whose row (column) maximum exceeds τ.
        rows = arr.max(axis=2)[:, None, :] > values[None, :, None]  # (B, T, H)
        cols = arr.max(axis=1)[:, None, :] > values[None, :, None]  # (B, T, W)
        has = rows.any(axis=2)
        r_min = rows.argmax(axis=2)
        r_max = height - 1 - rows[:, :, ::-1].argmax(axis=2)
        c_min = cols.argmax(axis=2)
        c_max = width - 1 - cols[:, :, ::-1].argmax(axis=2)
        boxes = np.stack([c_min, r_min, c_max + 1, r_max + 1], axis=2).astype(np.float32)
        boxes[~has] = 0.0
    else:
        # Answer the distinct thresholds in descending order, then map back to the caller's order.
        unique_desc = np.unique(values)[::-1].copy()
        slot = np.searchsorted(-unique_desc, -values)
        boxes_u = np.zeros((n_img, unique_desc.size, 4), dtype=np.float32)
        has_u = np.zeros((n_img, unique_desc.size), dtype=np.bool_)
        threads = max(1, min(int(num_threads), n_img))
        if threads == 1:
            _largest_component_boxes(arr, unique_desc, boxes_u, has_u)
        else:
            bounds = np.linspace(0, n_img, threads + 1).astype(np.int64)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                jobs = [
                    pool.submit(_largest_component_boxes, arr[s:e], unique_desc, boxes_u[s:e], has_u[s:e])
                    for s, e in zip(bounds[:-1], bounds[1:], strict=True)
                    if e > s
                ]
                for job in jobs:
                    job.result()
        boxes, has = boxes_u[:, slot], has_u[:, slot]
    out = Boxes(torch.from_numpy(np.ascontiguousarray(boxes)), torch.from_numpy(np.ascontiguousarray(has)))
    return Boxes(out.boxes[:, 0], out.has_box[:, 0]) if scalar else out


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def extract_boxes_reference(maps: Tensor, threshold: float, mode: BoxMode = "largest") -> Boxes:
    """Straightforward per-image, per-threshold version of `extract_boxes` with scipy.ndimage.label.

    Kept as the executable definition the fast path is tested against. Returns (B, 4), (B,).
    """
    _check_choice("mode", mode, get_args(BoxMode))
    arr = _as_map_array(maps)
    tau = np.float32(threshold)
    boxes = np.zeros((arr.shape[0], 4), dtype=np.float32)
    has = np.zeros(arr.shape[0], dtype=bool)
    for i, m in enumerate(arr):
        mask = m > tau
        if not mask.any():
            continue
        if mode == "largest":
            labels, _ = scipy.ndimage.label(mask, structure=_EIGHT_CONNECTED)
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            # scipy numbers components by their first pixel in raster order, and argmax keeps the first
            # maximum: ties go to the component met first.
            mask = labels == int(counts.argmax())
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        has[i] = True
    return Boxes(torch.from_numpy(boxes), torch.from_numpy(has))


def box_iou(
    a: Tensor,
    b: Tensor,
    convention: IoUConvention = "continuous",
    pred_valid: Tensor | None = None,
) -> Tensor:
    """Elementwise IoU of boxes a[..., :] and b[..., :] (broadcast over the leading dims), in float64.

    inter = max(0, min(a_x2, b_x2) − max(a_x1, b_x1)) · max(0, min(a_y2, b_y2) − max(a_y1, b_y1)), always
    clamped (bug B1: unclamped, disjoint diagonal boxes can score 0.88); IoU = inter / union, 0 where
    the union is 0. `inclusive_pixels` treats coordinates as inclusive integer pixel corners (+1 on
    widths and heights), for comparison with code that does. `pred_valid` (broadcastable bool) sets
    the IoU of rows without a predicted box to 0.
    """
    _check_choice("convention", convention, get_args(IoUConvention))
    a = a.double()
    b = b.double()
    extra = 1.0 if convention == "inclusive_pixels" else 0.0
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + extra).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + extra).clamp(min=0)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + extra).clamp(min=0) * (a[..., 3] - a[..., 1] + extra).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0] + extra).clamp(min=0) * (b[..., 3] - b[..., 1] + extra).clamp(min=0)
    union = area_a + area_b - inter
    iou = torch.where(
        union > 0, inter / union.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(union)
    )
    iou = iou.clamp(0.0, 1.0)
    if pred_valid is not None:
        iou = torch.where(pred_valid.to(iou.device), iou, torch.zeros_like(iou))
    return iou


def topk_correct(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """(B,) bool: the target is among the k largest logits (all classes when k ≥ K)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == targets.long()[:, None]).any(dim=1)


def variant_key(variant: str, k: int) -> str:
    """Name of a map variant with region size k, e.g. `mean_others_k3` (the `{variant}_k{k}` of spec §3.5)."""
    return f"{variant}_k{k}"


def localization_ious(
    feature_map: Tensor,
    weight: Tensor,
    logits: Tensor,
    targets: Tensor,
    gt_boxes: Tensor,
    *,
    image_size: int | tuple[int, int],
    thresholds: Sequence[float] = (0.2,),
    variants: Sequence[MapVariant] = MAP_VARIANTS,
    region_ks: Sequence[int] = (1,),
    region_padding: RegionPadding = "full",
    box_mode: BoxMode = "largest",
    iou_convention: IoUConvention = "continuous",
    num_threads: int = 1,
) -> dict[str, Tensor]:
    """Per-image IoUs of every map variant × region size × threshold from one forward pass (spec §4).

    Maps are computed on the features' device in fp32/fp64 with autocast off; only the normalised maps of
    one variant at a time go to the CPU for box extraction.

    Args:
        feature_map: (B, C, h, w) last conv map F from `forward_with_map` in eval mode.
        weight: (K, C) classifier weight (`backbone.classifier_weight`).
        logits: (B, K) logits of the same pass.
        targets: (B,) ground-truth labels (maps are for the GT class).
        gt_boxes: (B, 4) GT boxes in the S_c × S_c frame of the input.
        image_size: S_c (or (H, W)) the maps are resized to.
        thresholds: the τ values (pass `LocalizationMetrics.thresholds`).
        variants, region_ks: the grid; keys are `variant_key(variant, k)`.
        iou_convention: with `inclusive_pixels` the predicted boxes are turned into inclusive corners
            (x2 − 1, y2 − 1) so that they still cover exactly their pixels; GT boxes are used as given.

    Returns:
        {"cam_k1": (B, T) float64 CPU IoUs, ...}; 0 where the mask is empty.
    """
    if gt_boxes.shape != (feature_map.shape[0], 4):
        raise ValueError(f"gt_boxes must be ({feature_map.shape[0]}, 4), got {tuple(gt_boxes.shape)}")
    gt = gt_boxes.detach().to("cpu", torch.float64)[:, None, :]
    out: dict[str, Tensor] = {}
    device_type = feature_map.device.type
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        for variant in variants:
            raw = activation_maps(feature_map.detach(), weight.detach(), logits.detach(), targets, variant)
            for k in region_ks:
                normalized = upsample_normalize(region_sum(raw, k, region_padding), image_size)
                boxes, has = extract_boxes(normalized, list(thresholds), box_mode, num_threads)
                if iou_convention == "inclusive_pixels":
                    boxes = boxes - torch.tensor([0.0, 0.0, 1.0, 1.0])
                out[variant_key(variant, k)] = box_iou(boxes, gt, iou_convention, pred_valid=has)
    return out


# --------------------------------------------------------------------------------------------- metrics


def _tau_label(tau: float) -> str:
    return f"{tau:.2f}" if abs(round(tau, 2) - tau) < 1e-9 else f"{tau:g}"


class LocalizationMetrics(Metric):
    """WSOL metrics as hits / N over the whole split, for a grid of map variants and thresholds.

    States (all `dist_reduce_fx="sum"`): `count`, `top1_cls_hits`, `top5_cls_hits` (scalars) and, per
    variant v and threshold τ, `gt_known_hits`, `top1_loc_hits`, `top5_loc_hits` (long) and `iou_sum`
    (float64), each of shape (V, T).

    `compute()` returns a flat dict of floats. At the headline threshold (`threshold`, default 0.2):
        top1_cls, top1_err (= 1 − top1_cls), top5_cls,
        {v}/gt_known_loc, {v}/top1_loc, {v}/top1_loc_err, {v}/top5_loc, {v}/miou
    and, when more than one threshold is configured (the τ-sweep), for every τ:
        {v}/gt_known_loc@{τ:.2f}, {v}/top1_loc@{τ:.2f}
    plus {v}/max_box_acc (max over τ of GT-known Loc; an oracle number on test) and {v}/best_threshold.
    All values are fractions in [0, 1] except `count`, the reduced number of images, which the caller
    should check against the split size (exactly-once evaluation, spec §4). Top-1 Loc counts
    IoU ≥ iou_threshold ∧ ŷ = y; Top-5 Loc IoU ≥ iou_threshold ∧ y ∈ top-5.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        variants: Sequence[str],
        thresholds: Sequence[float] = (0.2,),
        threshold: float = 0.2,
        iou_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.variants = tuple(variants)
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct and non-empty, got {list(variants)}")
        if not self.thresholds or len(set(self.thresholds)) != len(self.thresholds):
            raise ValueError(f"thresholds must be distinct and non-empty, got {list(thresholds)}")
        matches = [i for i, t in enumerate(self.thresholds) if math.isclose(t, threshold, abs_tol=1e-9)]
        if not matches:
            raise ValueError(f"the headline threshold {threshold} is not among thresholds {self.thresholds}")
        self.threshold = float(threshold)
        self._headline = matches[0]
        self.iou_threshold = float(iou_threshold)
        shape = (len(self.variants), len(self.thresholds))
        for name in ("count", "top1_cls_hits", "top5_cls_hits"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("gt_known_hits", "top1_loc_hits", "top5_loc_hits"):
            self.add_state(name, default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ious: Mapping[str, Tensor], top1_correct: Tensor, top5_correct: Tensor) -> None:
        """Add one batch.

        Args:
            ious: {variant: (B, T) IoUs} for exactly the configured variants, columns in the order of
                `self.thresholds` ((B,) is accepted when T = 1), e.g. from `localization_ious`.
            top1_correct: (B,) bool, ŷ = y.
            top5_correct: (B,) bool, y among the top-5 logits (see `topk_correct`).
        """
        if set(ious) != set(self.variants):
            raise ValueError(f"ious has keys {sorted(ious)}, expected {sorted(self.variants)}")
        device = self.count.device
        top1 = top1_correct.to(device=device, dtype=torch.bool).flatten()
        top5 = top5_correct.to(device=device, dtype=torch.bool).flatten()
        batch = top1.numel()
        if top5.numel() != batch:
            raise ValueError("top1_correct and top5_correct must have the same length")
        n_thr = len(self.thresholds)
        for v, name in enumerate(self.variants):
            iou = ious[name].to(device=device, dtype=torch.float64)
            if iou.ndim == 1 and n_thr == 1:
                iou = iou[:, None]
            if iou.shape != (batch, n_thr):
                raise ValueError(f"ious[{name!r}] must be ({batch}, {n_thr}), got {tuple(iou.shape)}")
            hit = iou >= self.iou_threshold
            self.gt_known_hits[v] += hit.sum(dim=0)
            self.top1_loc_hits[v] += (hit & top1[:, None]).sum(dim=0)
            self.top5_loc_hits[v] += (hit & top5[:, None]).sum(dim=0)
            self.iou_sum[v] += iou.sum(dim=0)
        self.count += batch
        self.top1_cls_hits += top1.sum()
        self.top5_cls_hits += top5.sum()

    def compute(self) -> dict[str, float]:
        n = int(self.count)
        denom = float(max(n, 1))
        top1_cls = int(self.top1_cls_hits) / denom
        out: dict[str, float] = {
            "count": float(n),
            "top1_cls": top1_cls,
            "top1_err": 1.0 - top1_cls,
            "top5_cls": int(self.top5_cls_hits) / denom,
        }
        gt_known = (self.gt_known_hits.double() / denom).cpu()
        top1_loc = (self.top1_loc_hits.double() / denom).cpu()
        top5_loc = (self.top5_loc_hits.double() / denom).cpu()
        miou = (self.iou_sum / denom).cpu()
        h = self._headline
        for v, name in enumerate(self.variants):
            out[f"{name}/gt_known_loc"] = float(gt_known[v, h])
            out[f"{name}/top1_loc"] = float(top1_loc[v, h])
            out[f"{name}/top1_loc_err"] = 1.0 - float(top1_loc[v, h])
            out[f"{name}/top5_loc"] = float(top5_loc[v, h])
            out[f"{name}/miou"] = float(miou[v, h])
            if len(self.thresholds) > 1:
                for t, tau in enumerate(self.thresholds):
                    out[f"{name}/gt_known_loc@{_tau_label(tau)}"] = float(gt_known[v, t])
                    out[f"{name}/top1_loc@{_tau_label(tau)}"] = float(top1_loc[v, t])
                best = int(gt_known[v].argmax())
                out[f"{name}/max_box_acc"] = float(gt_known[v, best])
                out[f"{name}/best_threshold"] = self.thresholds[best]
        return out


class ClassBalanceMetrics(Metric):
    """Logit-only metrics of the PC-softmax experiments (spec §3.2, §3.5), as split-level sum states.

    States (`dist_reduce_fx="sum"`): per-class `correct` and `total` (K,), and the float64 sums of
    `mi_terms` (`sum_log_pc`, `sum_log_softmax`, `sum_ba`). `compute()` returns floats:
        acc, macro_acc (mean over classes present in the split), minority_acc / majority_acc (only when
        `minority_classes` is given: mean per-class accuracy over those classes / over the others),
        prior_weighted_acc (Σ_k p_k acc_k with the training prior, renormalised over present classes),
        mi_pc, mi_bal, mi_ba (nats), count (the reduced number of samples).

    Args:
        log_prior: (K,) log training-split proportions π (always the training prior, also for the MI).
        trained_with: `ce` or `pc_softmax`, the loss the model was trained with (sets q in Î_BA).
        minority_classes: the down-sampled classes, if any.
    """

    higher_is_better = True
    full_state_update = False
    log_prior: Tensor

    def __init__(
        self,
        log_prior: Tensor,
        trained_with: TrainedWith,
        minority_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if log_prior.ndim != 1 or log_prior.numel() < 2:
            raise ValueError(f"log_prior must be (K,) with K >= 2, got shape {tuple(log_prior.shape)}")
        _check_choice("trained_with", trained_with, get_args(TrainedWith))
        self.num_classes = int(log_prior.numel())
        self.trained_with: TrainedWith = trained_with
        minority = sorted({int(c) for c in minority_classes})
        if any(c < 0 or c >= self.num_classes for c in minority):
            raise ValueError(f"minority_classes {minority} out of range for {self.num_classes} classes")
        self.minority_classes = tuple(minority)
        self.register_buffer("log_prior", log_prior.detach().float().clone(), persistent=False)
        k = self.num_classes
        self.add_state("correct", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("sum_log_pc", "sum_log_softmax", "sum_ba"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor, preds: Tensor | None = None) -> None:
        """Add one batch; `preds` defaults to argmax of the logits (pass post-hoc adjusted ones if used)."""
        device = self.total.device
        y = targets.long().to(device)
        pred = (logits.argmax(dim=1) if preds is None else preds).long().to(device)
        self.total += torch.bincount(y, minlength=self.num_classes)
        self.correct += torch.bincount(y[pred == y], minlength=self.num_classes)
        sums = mi_terms(logits, targets, self.log_prior, self.trained_with)
        self.sum_log_pc += sums["sum_log_pc"].to(device)
        self.sum_log_softmax += sums["sum_log_softmax"].to(device)
        self.sum_ba += sums["sum_ba"].to(device)

    def compute(self) -> dict[str, float]:
        total = self.total.double().cpu()
        correct = self.correct.double().cpu()
        n = float(total.sum())
        present = total > 0
        per_class = torch.where(present, correct / total.clamp(min=1), torch.zeros_like(total))
        out: dict[str, float] = {
            "count": n,
            "acc": float(correct.sum()) / max(n, 1.0),
            "macro_acc": float(per_class[present].mean()) if present.any() else 0.0,
        }
        if self.minority_classes:
            is_minority = torch.zeros(self.num_classes, dtype=torch.bool)
            is_minority[list(self.minority_classes)] = True
            for name, group in (("minority_acc", is_minority), ("majority_acc", ~is_minority)):
                chosen = group & present
                out[name] = float(per_class[chosen].mean()) if chosen.any() else 0.0
        prior = self.log_prior.double().exp().cpu() * present
        out["prior_weighted_acc"] = float((prior * per_class).sum() / prior.sum()) if present.any() else 0.0
        if n > 0:
            out.update(mi_from_sums(self.sum_log_pc, self.sum_log_softmax, self.sum_ba, n, self.num_classes))
        else:
            out.update({"mi_pc": 0.0, "mi_bal": 0.0, "mi_ba": 0.0})
        return out
