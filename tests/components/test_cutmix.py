"""CutMix boxes (spec T10): λ from the actual mask, rectangular boxes, seeded determinism, mixing."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.components.cutmix import cutmix, sample_cutmix_boxes


@pytest.mark.parametrize(("height", "width"), [(32, 32), (16, 24), (7, 5)])
def test_t10_lambda_is_one_minus_mask_mean_and_in_range(height: int, width: int) -> None:
    mask, lam = sample_cutmix_boxes(512, height, width, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (512, 1, height, width) and mask.dtype == torch.bool
    assert lam.shape == (512,) and lam.dtype == torch.float32
    assert torch.equal(lam, 1.0 - mask.float().mean(dim=(1, 2, 3)))
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert (lam < 1).any()


def test_boxes_are_axis_aligned_rectangles_with_even_unclipped_sides() -> None:
    height, width = 20, 28
    mask, _ = sample_cutmix_boxes(256, height, width, generator=torch.Generator().manual_seed(1))
    rows, cols = mask.any(dim=3), mask.any(dim=2)  # (n, 1, H), (n, 1, W)
    assert torch.equal(rows[..., :, None] & cols[..., None, :], mask)
    row_extent, col_extent = rows.sum(dim=(1, 2)), cols.sum(dim=(1, 2))
    # A box spans centre ± ⌊side/2⌋, so an unclipped side is even.
    top = rows.squeeze(1).float().argmax(dim=1)  # first covered row
    interior = (row_extent > 0) & (top > 0) & (top + row_extent < height)
    assert interior.any()
    assert (row_extent[interior] % 2 == 0).all()
    # cut side ≤ ⌊size·√0.5⌋.
    assert row_extent.max() <= int(height * 0.5**0.5) and col_extent.max() <= int(width * 0.5**0.5)


def test_box_distribution_is_plausible() -> None:
    _, lam = sample_cutmix_boxes(20000, 32, 32, generator=torch.Generator().manual_seed(2))
    # Unclipped, E[1 − λ] = E[1 − λ′] = 1/4; even-side truncation and clipping only shrink boxes.
    assert 0.10 < (1 - lam).mean().item() < 0.25
    assert (lam < 0.6).float().mean().item() > 0.01


def test_sampling_is_a_function_of_the_generator_only() -> None:
    a = sample_cutmix_boxes(64, 32, 32, generator=torch.Generator().manual_seed(7))
    b = sample_cutmix_boxes(64, 32, 32, generator=torch.Generator().manual_seed(7))
    c = sample_cutmix_boxes(64, 32, 32, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)  # the global RNG must not matter
    d = sample_cutmix_boxes(64, 32, 32, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], d[0])
    assert not torch.equal(a[0], c[0])


def test_zero_samples() -> None:
    mask, lam = sample_cutmix_boxes(0, 8, 8, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (0, 1, 8, 8) and lam.shape == (0,)


def test_cutmix_takes_masked_pixels_from_the_partner() -> None:
    n, channels, height, width = 6, 3, 10, 12
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, height, width).clone()
    mask, lam = sample_cutmix_boxes(n, height, width, generator=torch.Generator().manual_seed(3))
    permutation = torch.tensor([3, 0, 5, 1, 2, 4])
    mixed = cutmix(images, mask, permutation)
    expected = torch.where(
        mask, permutation.float().view(n, 1, 1, 1), torch.arange(n).float().view(n, 1, 1, 1)
    )
    assert torch.equal(mixed, expected.expand_as(mixed))
    # λ_i is the share of sample i's own pixels in ũ_i.
    own_share = (mixed == torch.arange(n).float().view(n, 1, 1, 1)).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(own_share, lam)
    assert torch.equal(cutmix(images, mask, torch.arange(n)), images)
