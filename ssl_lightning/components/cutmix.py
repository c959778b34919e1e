"""CutMix boxes (Yun et al., 2019) as used by InfoMatch to mix weak views within a batch.

Box sampling, per sample i (TorchSSL/USB convention):

    λ′_i ~ Beta(1, 1) = U(0, 1),   λ′_i ← max(λ′_i, 1 − λ′_i)
    cut_h = ⌊H·√(1 − λ′_i)⌋,   cut_w = ⌊W·√(1 − λ′_i)⌋
    (cy, cx) uniform integer centre in [0, H) × [0, W)
    rows [cy − ⌊cut_h/2⌋, cy + ⌊cut_h/2⌋) and columns [cx − ⌊cut_w/2⌋, cx + ⌊cut_w/2⌋), clipped to the image
    λ_i = 1 − |box_i| / (H·W) ∈ [0.5, 1]

The box area is at most (1 − λ′)·H·W ≤ H·W/2, hence λ ≥ 0.5. λ is the fraction of the mixed image
that comes from the sample itself, measured on the clipped mask rather than taken from λ′.
"""

from __future__ import annotations

import torch


def sample_cutmix_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one CutMix box per sample.

    Args:
        n: number of boxes.
        height, width: image size H, W.
        generator: the only source of randomness. The draws happen on the generator's device (CPU when
            none is given), so a CPU generator seeded from (seed, step) gives the same boxes on any device.
        device: where the returned tensors live (default: the generator's device).

    Returns:
        mask: (n, 1, H, W) bool, True where the pixel is taken from the partner image.
        lam: (n,) float32, λ_i = 1 − mean(mask_i).
    """
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n ≥ 0 and a positive image size, got n={n}, height={height}, width={width}")
    sample_device = generator.device if generator is not None else torch.device("cpu")
    out_device = torch.device(device) if device is not None else sample_device

    lam_prime = torch.rand(n, generator=generator, device=sample_device)
    lam_prime = torch.maximum(lam_prime, 1.0 - lam_prime)
    cut_ratio = torch.sqrt(1.0 - lam_prime)
    half_h = torch.floor(height * cut_ratio).long() // 2
    half_w = torch.floor(width * cut_ratio).long() // 2
    centre_y = torch.randint(0, height, (n,), generator=generator, device=sample_device)
    centre_x = torch.randint(0, width, (n,), generator=generator, device=sample_device)

    bounds = torch.stack(
        [
            (centre_y - half_h).clamp(0, height),
            (centre_y + half_h).clamp(0, height),
            (centre_x - half_w).clamp(0, width),
            (centre_x + half_w).clamp(0, width),
        ],
        dim=1,
    ).to(out_device)
    top, bottom, left, right = (b.view(n, 1, 1, 1) for b in bounds.unbind(dim=1))
    rows = torch.arange(height, device=out_device).view(1, 1, height, 1)
    cols = torch.arange(width, device=out_device).view(1, 1, 1, width)
    mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    # Integer pixel count divided once: λ is exactly 1 − mean(mask) in fp32, never promoted to float64.
    lam = 1.0 - mask.flatten(1).sum(dim=1).float() / float(height * width)
    return mask, lam


def cutmix(images: torch.Tensor, mask: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """ũ_i = (1 − M_i) ⊙ x_i + M_i ⊙ x_π(i) for images (n, C, H, W), mask (n, 1, H, W) bool, π (n,)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    return torch.where(mask, images[permutation], images)
