"""Maps, boxes, IoU and split-level metrics of InfoCAM / PC-softmax: specs/infocam.md §8 tests 11–14, 16, 17, 19."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_lightning.losses.pc_softmax import mi_from_sums, mi_terms, prior_from_counts
from ssl_lightning.metrics.localization import (
    MAP_VARIANTS,
    TAU_SWEEP,
    Boxes,
    ClassBalanceMetrics,
    LocalizationMetrics,
    activation_maps,
    box_iou,
    extract_boxes,
    extract_boxes_reference,
    localization_ious,
    region_sum,
    topk_correct,
    upsample_normalize,
    variant_key,
)
from ssl_lightning.nets import build_backbone

D64 = torch.float64


def _random_head(batch: int = 6, channels: int = 8, classes: int = 5, side: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.rand(batch, channels, side, side, generator=gen, dtype=D64)  # post-ReLU: F ≥ 0
    weight = torch.randn(classes, channels, generator=gen, dtype=D64)
    bias = torch.randn(classes, generator=gen, dtype=D64)
    logits = feats.mean(dim=(2, 3)) @ weight.T + bias
    targets = torch.randint(0, classes, (batch,), generator=gen)
    return feats, weight, bias, logits, targets


# ----------------------------------------------------------------------------- test 11: GAP identity


def test_gap_identity_on_random_tensors() -> None:
    feats, weight, bias, logits, y = _random_head()
    cam = activation_maps(feats, weight, logits, y, "cam")
    assert cam.shape == (6, 4, 4) and cam.dtype == D64
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + bias[y], logits.gather(1, y[:, None]).squeeze(1))

    others = activation_maps(feats, weight, logits, y, "mean_others")
    no_bias = logits - bias
    own = no_bias.gather(1, y[:, None]).squeeze(1)
    mean_others = (no_bias.sum(dim=1) - own) / (no_bias.shape[1] - 1)
    torch.testing.assert_close(others.mean(dim=(1, 2)), own - mean_others)

    least = activation_maps(feats, weight, logits, y, "least_likely")
    k_star = logits.argmin(dim=1)
    torch.testing.assert_close(least.mean(dim=(1, 2)), own - no_bias.gather(1, k_star[:, None]).squeeze(1))


def test_gap_identity_through_a_backbone_with_adl_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = build_backbone("digits_cnn", num_classes=10, in_channels=1, image_size=32, adl_positions=["1", "3"])
    net.eval()
    with torch.no_grad():
        logits, fmap = net.forward_with_map(torch.randn(3, 1, 32, 32))
        y = torch.tensor([0, 4, 9])
        cam = activation_maps(fmap, net.classifier_weight, logits, y, "cam")
    assert fmap.dtype == torch.float32 and (fmap >= 0).all()
    expected = logits.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + net.classifier_bias[y], expected, rtol=1e-5, atol=1e-5)


def test_half_precision_features_give_fp32_maps() -> None:
    feats, weight, _, logits, y = _random_head()
    maps = activation_maps(feats.to(torch.bfloat16), weight.float(), logits.float(), y, "mean_others")
    assert maps.dtype == torch.float32


def test_variant_validation() -> None:
    feats, weight, _, logits, y = _random_head()
    with pytest.raises(ValueError, match="variant must be one of"):
        activation_maps(feats, weight, logits, y, "gradcam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 classes"):
        activation_maps(feats, weight[:1], logits[:, :1], y * 0, "mean_others")


# ------------------------------------------------------------------------------- test 12: region sum


def test_region_sum() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(region_sum(a, 1), a)
    full = region_sum(a, 2)
    torch.testing.assert_close(full, torch.tensor([[[1.0, 3.0, 2.0], [4.0, 10.0, 6.0], [3.0, 7.0, 4.0]]]))
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 7, generator=gen, dtype=D64)
    for k in (2, 3, 4):
        r = region_sum(maps, k, "full")
        assert r.shape == (3, 5 + k - 1, 7 + k - 1)
        torch.testing.assert_close(r.sum(dim=(1, 2)), k * k * maps.sum(dim=(1, 2)))
        same = region_sum(maps, k, "same")
        assert same.shape == (3, 5, 7)
        # `same` pads ⌊(k−1)/2⌋ before: its (u, v) is the full output at (u + ⌈(k−1)/2⌉, v + ⌈(k−1)/2⌉).
        off = k - 1 - (k - 1) // 2
        torch.testing.assert_close(same, r[:, off : off + 5, off : off + 7])
    with pytest.raises(ValueError, match="k must be >= 1"):
        region_sum(maps, 0)


# --------------------------------------------------------------------------- test 13: min–max


def test_min_max_normalisation_is_affine_invariant() -> None:
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(4, 6, 6, generator=gen)
    base = upsample_normalize(maps, 32)
    assert base.shape == (4, 32, 32) and base.dtype == torch.float32
    assert torch.allclose(base.amin(dim=(1, 2)), torch.zeros(4)) and torch.allclose(
        base.amax(dim=(1, 2)), torch.ones(4)
    )
    torch.testing.assert_close(upsample_normalize(3.5 * maps - 2.0, 32), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(upsample_normalize(-2.0 * maps + 1.0, 32), 1.0 - base, rtol=0, atol=1e-6)
    assert upsample_normalize(maps, (20, 24)).shape == (4, 20, 24)


def test_constant_map_gives_an_empty_mask_and_zero_iou() -> None:
    maps = torch.stack([torch.zeros(5, 5), torch.full((5, 5), 3.7), torch.full((5, 5), -1e6)])
    # (Not through region_sum: its zero padding makes a constant map non-constant near the border.)
    normalized = upsample_normalize(maps, 40)
    assert torch.equal(normalized, torch.zeros(3, 40, 40))
    boxes, has = extract_boxes(normalized, 0.2)
    assert not has.any() and torch.equal(boxes, torch.zeros(3, 4))
    for tau in (0.0, 0.2):
        ref = extract_boxes_reference(normalized, tau)
        assert not ref.has_box.any()
    iou = box_iou(boxes, torch.tensor([[0.0, 0.0, 40.0, 40.0]]), pred_valid=has)
    assert torch.equal(iou, torch.zeros(3, dtype=D64))


def test_least_likely_for_the_least_likely_class_is_an_empty_mask() -> None:
    feats, weight, _, logits, _ = _random_head(seed=2)
    y = logits.argmin(dim=1)
    raw = activation_maps(feats, weight, logits, y, "least_likely")
    assert torch.equal(raw, torch.zeros_like(raw))
    ious = localization_ious(
        feats,
        weight,
        logits,
        y,
        torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(6, 1),
        image_size=16,
        thresholds=(0.0, 0.2),
        variants=("least_likely",),
        region_ks=(1, 3),
    )
    for value in ious.values():
        assert torch.equal(value, torch.zeros(6, 2, dtype=D64))


# ------------------------------------------------------------------------------------ test 14: K = 2


def test_two_classes_mean_others_equals_least_likely() -> None:
    feats, weight, _, logits, _ = _random_head(classes=2, seed=3)
    # The other class is the least likely one exactly when the target is the argmax.
    y = logits.argmax(dim=1)
    torch.testing.assert_close(
        activation_maps(feats, weight, logits, y, "mean_others"),
        activation_maps(feats, weight, logits, y, "least_likely"),
    )


# ------------------------------------------------------------------------------------- test 16: boxes


def _box_test_map() -> torch.Tensor:
    m = torch.zeros(1, 8, 8)
    m[0, 1:4, 2:6] = 1.0
    m[0, 6, 6] = 0.9
    return m


def test_boxes_hand_case() -> None:
    m = _box_test_map()
    for fn in (extract_boxes, extract_boxes_reference):
        largest = fn(m, 0.2, "largest")
        assert isinstance(largest, Boxes)
        assert largest.boxes.tolist() == [[2.0, 1.0, 6.0, 4.0]] and largest.has_box.tolist() == [True]
        assert fn(m, 0.2, "all_foreground").boxes.tolist() == [[2.0, 1.0, 7.0, 7.0]]
    diagonal = torch.zeros(1, 4, 4)
    diagonal[0, 0, 0] = diagonal[0, 1, 1] = 1.0
    for fn in (extract_boxes, extract_boxes_reference):
        assert fn(diagonal, 0.2).boxes.tolist() == [[0.0, 0.0, 2.0, 2.0]]
    # The mask is strict: a pixel exactly at τ is background.
    assert extract_boxes(m, 0.9).boxes.tolist() == [[2.0, 1.0, 6.0, 4.0]]
    assert not extract_boxes(m, 1.0).has_box.any()


def test_box_ties_go_to_the_first_component_in_raster_order() -> None:
    m = torch.zeros(2, 6, 6)
    m[0, 4:6, 0:2] = 1.0  # 4 pixels, starts at raster index 24
    m[0, 0:2, 4:6] = 1.0  # 4 pixels, starts at raster index 4 → wins
    m[1, 0, 0] = 1.0  # a singleton first, then a larger blob
    m[1, 3:5, 3:5] = 1.0
    for fn in (extract_boxes, extract_boxes_reference):
        assert fn(m, 0.5).boxes.tolist() == [[4.0, 0.0, 6.0, 2.0], [3.0, 3.0, 5.0, 5.0]]


def test_sweep_matches_the_scipy_reference() -> None:
    # Smooth random maps (as after a bicubic upsampling), plus noisy ones with many small components.
    gen = torch.Generator().manual_seed(4)
    smooth = upsample_normalize(torch.randn(24, 5, 5, generator=gen), 33)
    noisy = torch.rand(8, 19, 23, generator=gen)
    taus = [round(0.05 * i, 2) for i in range(20)][::-1] + [0.2]  # any order, duplicates allowed
    for maps in (smooth, noisy):
        for mode in ("largest", "all_foreground"):
            sweep = extract_boxes(maps, taus, mode)  # type: ignore[arg-type]
            assert sweep.boxes.shape == (maps.shape[0], len(taus), 4)
            assert sweep.has_box.shape == (maps.shape[0], len(taus))
            threaded = extract_boxes(maps, taus, mode, num_threads=3)  # type: ignore[arg-type]
            assert torch.equal(threaded.boxes, sweep.boxes) and torch.equal(threaded.has_box, sweep.has_box)
            for j, tau in enumerate(taus):
                ref = extract_boxes_reference(maps, tau, mode)  # type: ignore[arg-type]
                assert torch.equal(sweep.boxes[:, j], ref.boxes), (mode, tau)
                assert torch.equal(sweep.has_box[:, j], ref.has_box), (mode, tau)


# --------------------------------------------------------------------------------------- test 17: IoU


def _iou(a: list[float], b: list[float], convention: str = "continuous") -> float:
    return float(box_iou(torch.tensor([a]), torch.tensor([b]), convention)[0])  # type: ignore[arg-type]


def test_iou_values() -> None:
    assert _iou([3, 4, 10, 12], [3, 4, 10, 12]) == 1.0
    assert _iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3, abs=1e-12)
    assert _iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert _iou([0, 0, 60, 60], [120, 120, 180, 180]) == 0.0  # the unclamped formula gives 0.879 (B1)
    assert _iou([0, 0, 9, 9], [0, 0, 4, 9], "inclusive_pixels") == 0.5
    assert _iou([0, 0, 60, 60], [120, 120, 180, 180], "inclusive_pixels") == 0.0
    assert _iou([2, 2, 2, 2], [2, 2, 2, 2]) == 0.0  # zero union


def test_iou_is_symmetric_in_unit_interval_and_broadcasts() -> None:
    gen = torch.Generator().manual_seed(5)
    lo_a, lo_b = torch.rand(2, 200, 2, generator=gen) * 40
    a = torch.cat([lo_a, lo_a + torch.rand(200, 2, generator=gen) * 30], dim=1)
    b = torch.cat([lo_b, lo_b + torch.rand(200, 2, generator=gen) * 30], dim=1)
    for convention in ("continuous", "inclusive_pixels"):
        ab = box_iou(a, b, convention)  # type: ignore[arg-type]
        torch.testing.assert_close(ab, box_iou(b, a, convention))  # type: ignore[arg-type]
        assert ((ab >= 0) & (ab <= 1)).all()
    assert (box_iou(a, b) > 0).any() and (box_iou(a, b) == 0).any()
    grid = box_iou(a[:, None, :], b[None, :5, :])
    assert grid.shape == (200, 5)
    torch.testing.assert_close(grid[:, 3], box_iou(a, b[3:4].expand(200, 4)))
    valid = torch.arange(200) % 2 == 0
    masked = box_iou(a, b, pred_valid=valid)
    assert torch.equal(masked[~valid], torch.zeros(100, dtype=D64))
    torch.testing.assert_close(masked[valid], box_iou(a, b)[valid])


# --------------------------------------------------------------------------------- end-to-end pipeline


def test_localization_ious_finds_a_planted_object() -> None:
    # One channel fires on a 3×3 block of a 8×8 grid; the class weight reads that channel.
    feats = torch.zeros(2, 3, 8, 8)
    feats[0, 0, 2:5, 1:4] = 1.0
    feats[1, 0, 5:8, 4:7] = 1.0
    feats[:, 1] = 0.3
    weight = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = feats.mean(dim=(2, 3)) @ weight.T
    y = torch.tensor([0, 0])
    scale = 64 / 8
    gt = torch.tensor([[1.0, 2.0, 4.0, 5.0], [4.0, 5.0, 7.0, 8.0]]) * scale
    thresholds = (0.2, 0.5, 0.8)
    ious = localization_ious(
        feats,
        weight,
        logits,
        y,
        gt,
        image_size=64,
        thresholds=thresholds,
        variants=MAP_VARIANTS,
        region_ks=(1, 3),
    )
    assert set(ious) == {variant_key(v, k) for v in MAP_VARIANTS for k in (1, 3)}
    for value in ious.values():
        assert value.shape == (2, 3) and value.dtype == D64
        assert torch.isfinite(value).all() and ((value >= 0) & (value <= 1)).all()
    assert (ious["cam_k1"][:, 1] > 0.6).all()  # τ = 0.5 recovers the block up to bicubic blur
    assert (ious["mean_others_k1"][:, 1] > 0.6).all()
    # A low threshold on the un-summed map spreads the box well past the object.
    assert (ious["cam_k1"][:, 0] < ious["cam_k1"][:, 1]).all()

    inclusive = localization_ious(
        feats,
        weight,
        logits,
        y,
        gt - torch.tensor([0.0, 0.0, 1.0, 1.0]),
        image_size=64,
        thresholds=thresholds,
        variants=("cam",),
        iou_convention="inclusive_pixels",
    )
    torch.testing.assert_close(inclusive["cam_k1"], ious["cam_k1"], rtol=0.05, atol=0.02)


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.2]])
    assert topk_correct(logits, torch.tensor([1, 1]), 1).tolist() == [True, False]
    assert topk_correct(logits, torch.tensor([2, 2]), 2).tolist() == [True, True]
    assert topk_correct(logits, torch.tensor([0, 1]), 5).tolist() == [True, True]  # k ≥ K: always


# ---------------------------------------------------------------------------------- test 19: metrics


def _per_image_results(n: int = 53, thresholds: int = 3, seed: int = 6):
    gen = torch.Generator().manual_seed(seed)
    # Dyadic IoUs make every sum exact, so batching and rank splits must give bit-identical metrics.
    ious = {
        name: torch.randint(0, 65, (n, thresholds), generator=gen).double() / 64
        for name in ("cam_k1", "mean_others_k3")
    }
    top1 = torch.rand(n, generator=gen) < 0.7
    top5 = top1 | (torch.rand(n, generator=gen) < 0.5)
    return ious, top1, top5


def _feed(metric: LocalizationMetrics, ious, top1, top5, bounds) -> None:
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        metric.update({k: v[s:e] for k, v in ious.items()}, top1[s:e], top5[s:e])


def test_localization_metrics_hand_case() -> None:
    metric = LocalizationMetrics(["cam_k1"], thresholds=(0.2,))
    ious = {"cam_k1": torch.tensor([0.7, 0.5, 0.49, 0.0])}  # (B,) accepted with one threshold
    metric.update(ious, torch.tensor([True, False, True, True]), torch.tensor([True, True, True, True]))
    out = metric.compute()
    assert out["count"] == 4
    assert out["top1_cls"] == 0.75 and out["top1_err"] == 0.25 and out["top5_cls"] == 1.0
    assert out["cam_k1/gt_known_loc"] == 0.5
    assert out["cam_k1/top1_loc"] == 0.25 and out["cam_k1/top1_loc_err"] == 0.75
    assert out["cam_k1/top5_loc"] == 0.5
    assert out["cam_k1/miou"] == pytest.approx((0.7 + 0.5 + 0.49) / 4)
    assert not any("@" in key or "max_box_acc" in key for key in out)  # no sweep with one threshold


def test_localization_metrics_are_hits_over_n_whatever_the_batching() -> None:
    thresholds = (0.2, 0.35, 0.5)
    ious, top1, top5 = _per_image_results()
    n = top1.numel()

    def fresh() -> LocalizationMetrics:
        return LocalizationMetrics(list(ious), thresholds=thresholds, threshold=0.2)

    single = fresh()
    _feed(single, ious, top1, top5, [0, n])
    expected = single.compute()

    uneven = fresh()
    _feed(uneven, ious, top1, top5, [0, 1, 9, 10, 25, 26, 40, n])  # 7 uneven batches
    assert uneven.compute() == expected

    # Two simulated ranks, each with its own uneven batches; their sum states are reduced by summation.
    rank0, rank1 = fresh(), fresh()
    _feed(rank0, {k: v[:20] for k, v in ious.items()}, top1[:20], top5[:20], [0, 3, 20])
    _feed(rank1, {k: v[20:] for k, v in ious.items()}, top1[20:], top5[20:], [0, 17, 30, 33])
    rank0.merge_state(rank1)
    assert rank0.compute() == expected
    assert expected["count"] == n

    # Metrics are hits / N over the split (B3 computes means of running averages instead).
    for name, value in ious.items():
        hits = value >= 0.5
        assert expected[f"{name}/gt_known_loc"] == hits[:, 0].double().mean().item()
        assert expected[f"{name}/top1_loc"] == (hits[:, 0] & top1).double().mean().item()
        assert expected[f"{name}/top5_loc"] == (hits[:, 0] & top5).double().mean().item()
        assert expected[f"{name}/miou"] == value[:, 0].mean().item()
        for j, label in enumerate(("0.20", "0.35", "0.50")):
            assert expected[f"{name}/gt_known_loc@{label}"] == hits[:, j].double().mean().item()
            assert expected[f"{name}/top1_loc@{label}"] <= min(
                expected[f"{name}/gt_known_loc@{label}"], expected["top1_cls"]
            )
        best = hits.double().mean(dim=0).max().item()
        assert expected[f"{name}/max_box_acc"] == best
        assert expected[f"{name}/top1_loc"] <= min(expected[f"{name}/gt_known_loc"], expected["top1_cls"])
    assert all(0.0 <= v <= 1.0 for k, v in expected.items() if k != "count")

    # A padded duplicate on the second rank shows up in the count, which the caller asserts against N.
    padded0, padded1 = fresh(), fresh()
    _feed(padded0, {k: v[:27] for k, v in ious.items()}, top1[:27], top5[:27], [0, 27])
    pad = {k: torch.cat([v[27:], v[-1:]]) for k, v in ious.items()}
    _feed(padded1, pad, torch.cat([top1[27:], top1[-1:]]), torch.cat([top5[27:], top5[-1:]]), [0, 27])
    padded0.merge_state(padded1)
    assert padded0.compute()["count"] == n + 1


def test_tau_sweep_keys_and_max_box_acc() -> None:
    metric = LocalizationMetrics(["mean_others_k3"], thresholds=TAU_SWEEP, threshold=0.2)
    # Image i hits (IoU 1) exactly at the thresholds whose index is ≤ i: GT-known Loc falls with τ.
    ious = torch.stack([(torch.arange(20) <= i).double() for i in range(20)])
    metric.update(
        {"mean_others_k3": ious}, torch.ones(20, dtype=torch.bool), torch.ones(20, dtype=torch.bool)
    )
    out = metric.compute()
    assert out["mean_others_k3/gt_known_loc@0.00"] == 1.0
    assert out["mean_others_k3/gt_known_loc@0.15"] == 17 / 20
    assert out["mean_others_k3/gt_known_loc@0.95"] == 1 / 20
    assert out["mean_others_k3/gt_known_loc"] == out["mean_others_k3/gt_known_loc@0.20"] == 16 / 20
    assert out["mean_others_k3/max_box_acc"] == 1.0 and out["mean_others_k3/best_threshold"] == 0.0
    assert sum("@" in key for key in out) == 2 * len(TAU_SWEEP)


def test_localization_metrics_validation() -> None:
    with pytest.raises(ValueError, match="headline threshold"):
        LocalizationMetrics(["cam_k1"], thresholds=(0.3, 0.4), threshold=0.2)
    metric = LocalizationMetrics(["cam_k1", "least_likely_k1"], thresholds=(0.2, 0.4))
    with pytest.raises(ValueError, match="expected"):
        metric.update(
            {"cam_k1": torch.zeros(2, 2)}, torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"must be \(2, 2\)"):
        metric.update(
            {"cam_k1": torch.zeros(2, 3), "least_likely_k1": torch.zeros(2, 3)},
            torch.ones(2, dtype=torch.bool),
            torch.ones(2, dtype=torch.bool),
        )


# -------------------------------------------------------------------------- PC-softmax class metrics


def test_class_balance_metrics() -> None:
    counts = [40, 10, 30, 20]
    log_prior = prior_from_counts(counts)
    # Per-class accuracies 1/2, 1, 0, 3/4 on a balanced split of 4 per class.
    targets = torch.arange(4).repeat_interleave(4)
    preds = targets.clone()
    preds[[0, 1]] = 1
    preds[8:12] = 3
    preds[15] = 0
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 4, generator=gen)
    metric = ClassBalanceMetrics(log_prior, "pc_softmax", minority_classes=[1, 3])
    metric.update(logits[:5], targets[:5], preds[:5])
    metric.update(logits[5:], targets[5:], preds[5:])
    out = metric.compute()
    acc = [0.5, 1.0, 0.0, 0.75]
    assert out["count"] == 16
    assert out["acc"] == pytest.approx(9 / 16)
    assert out["macro_acc"] == pytest.approx(sum(acc) / 4)
    assert out["minority_acc"] == pytest.approx((1.0 + 0.75) / 2)
    assert out["majority_acc"] == pytest.approx((0.5 + 0.0) / 2)
    p = torch.tensor(counts, dtype=D64) / sum(counts)
    assert out["prior_weighted_acc"] == pytest.approx(float((p * torch.tensor(acc, dtype=D64)).sum()))
    expected_mi = mi_from_sums(**mi_terms(logits, targets, log_prior, "pc_softmax"), num_classes=4)
    for key in ("mi_pc", "mi_bal", "mi_ba"):
        assert out[key] == pytest.approx(expected_mi[key], abs=1e-9)
    assert out["mi_ba"] == out["mi_pc"]

    # Default predictions are the argmax; a rank split reduces to the same numbers.
    first, second = ClassBalanceMetrics(log_prior, "ce"), ClassBalanceMetrics(log_prior, "ce")
    first.update(logits[:7], targets[:7])
    second.update(logits[7:], targets[7:])
    first.merge_state(second)
    merged = first.compute()
    whole = ClassBalanceMetrics(log_prior, "ce")
    whole.update(logits, targets)
    assert merged["acc"] == whole.compute()["acc"] == float((logits.argmax(1) == targets).double().mean())
    assert merged["mi_bal"] == pytest.approx(whole.compute()["mi_bal"], abs=1e-12)
    assert "minority_acc" not in merged
    assert merged["mi_bal"] == pytest.approx(
        math.log(4) - float(torch.nn.functional.cross_entropy(logits, targets)), abs=1e-6
    )


def test_class_balance_metrics_validation() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ClassBalanceMetrics(prior_from_counts([1, 1]), "ce", minority_classes=[2])
    with pytest.raises(ValueError, match="trained_with"):
        ClassBalanceMetrics(prior_from_counts([1, 1]), "focal")  # type: ignore[arg-type]


def test_cam_overlay_figure_draws_maps_and_boxes() -> None:
    from ssl_lightning.callbacks.figures import cam_overlay_figure

    overlays = {
        "images": torch.rand(3, 1, 16, 16), "maps": torch.rand(3, 16, 16),
        "gt_boxes": torch.tensor([[1.0, 2.0, 8.0, 9.0]] * 3), "pred_boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 3),
        "has_box": torch.tensor([True, False, True]), "threshold": torch.tensor(0.35),
    }
    figure = cam_overlay_figure(overlays, columns=2)
    patches = [len(axis.patches) for axis in figure.axes]
    assert patches[:3] == [2, 1, 2]  # the GT box always, the predicted box when there is one
