"""The ``affine`` view: seeding, shape, identity at zero ranges, randomness, and parity with torchvision."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_lightning.data import DigitsDataModule
from ssl_lightning.data.views import VIEW_NAMES, AffineView, ViewConfig, affine_bilinear, build_view


def _digit_like(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Noise on a bright blob in a black frame: a warp moves content and brings in black border."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.zeros(channels, height, width, dtype=torch.uint8)
    blob = torch.randint(60, 256, (channels, height // 2, width // 2), dtype=torch.uint8, generator=generator)
    image[:, height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = blob
    return image


def _seeded(view: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int) -> torch.Tensor:
    # The DataModule's per-sample seeding: a forked global generator set to a known seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return view(image)


def _config(**affine: object) -> ViewConfig:
    return ViewConfig(image_size=28, crop_pad=0, hflip=False, **affine)  # type: ignore[arg-type]


def test_affine_is_a_named_view_with_the_spec_defaults() -> None:
    assert "affine" in VIEW_NAMES
    config = ViewConfig(image_size=28, crop_pad=0, hflip=False)
    assert (config.affine_degrees, config.affine_translate, config.affine_scale) == (15.0, 0.1, (0.9, 1.1))
    view = build_view("affine", config)
    assert isinstance(view, AffineView)
    assert (view.degrees, view.translate, view.scale) == (15.0, 0.1, (0.9, 1.1))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width"), [(16, 16), (28, 28), (20, 26)])
def test_affine_keeps_shape_and_dtype(channels: int, height: int, width: int) -> None:
    view = build_view("affine", _config())
    image = _digit_like(channels, height, width)
    for seed in range(5):
        out = _seeded(view, image, seed)
        assert out.dtype == torch.uint8 and out.shape == image.shape


def test_affine_is_deterministic_under_the_torch_seed_and_varies_across_seeds() -> None:
    view = build_view("affine", _config())
    image = _digit_like(1, 28, 28)
    assert torch.equal(_seeded(view, image, 7), _seeded(view, image, 7))
    outputs = [_seeded(view, image, seed) for seed in range(8)]
    assert len({tuple(out.flatten().tolist()) for out in outputs}) == 8
    assert all(not torch.equal(out, image) for out in outputs)


def test_affine_uses_only_the_torch_generator() -> None:
    view = build_view("affine", _config())
    image = _digit_like(3, 28, 28)
    random.seed(1)
    np.random.seed(1)
    first = _seeded(view, image, 3)
    random.seed(2)
    np.random.seed(2)
    assert torch.equal(first, _seeded(view, image, 3))


def test_zero_ranges_give_the_identity_and_still_draw_four_numbers() -> None:
    view = build_view("affine", _config(affine_degrees=0.0, affine_translate=0.0, affine_scale=(1.0, 1.0)))
    image = _digit_like(3, 20, 26)
    for seed in range(5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = view(image)
            after_view = torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.rand(4, dtype=torch.float64)
            after_four = torch.get_rng_state()
        assert torch.equal(out, image)
        # A zero range consumes its draw, so the draws of the other ranges do not depend on it.
        assert torch.equal(after_view, after_four)


def test_warp_at_identity_parameters_is_exact() -> None:
    image = _digit_like(3, 20, 26)
    assert torch.equal(affine_bilinear(image, 0.0, (0.0, 0.0), 1.0), image)


def test_each_range_alone_changes_the_image() -> None:
    image = _digit_like(1, 28, 28)
    for affine in (
        {"affine_degrees": 15.0, "affine_translate": 0.0, "affine_scale": (1.0, 1.0)},
        {"affine_degrees": 0.0, "affine_translate": 0.1, "affine_scale": (1.0, 1.0)},
        {"affine_degrees": 0.0, "affine_translate": 0.0, "affine_scale": (0.9, 1.1)},
    ):
        view = build_view("affine", _config(**affine))
        changed = sum(not torch.equal(_seeded(view, image, seed), image) for seed in range(10))
        assert changed == 10, affine


def test_draws_cover_the_configured_ranges() -> None:
    view = AffineView(degrees=11.0, translate=0.125, scale=(0.9, 1.1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = [view.sample(16, 32) for _ in range(400)]
    angles = np.array([d[0] for d in draws])
    dx = np.array([d[1][0] for d in draws])
    dy = np.array([d[1][1] for d in draws])
    scales = np.array([d[2] for d in draws])
    for values, low, high in ((angles, -11.0, 11.0), (dx, -4.0, 4.0), (dy, -2.0, 2.0), (scales, 0.9, 1.1)):
        assert values.min() >= low and values.max() <= high
        # Uniform over the range: 400 draws reach within 5% of both ends.
        assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low)


@pytest.mark.parametrize("channels", [1, 3])
def test_warp_matches_torchvision_affine(channels: int) -> None:
    # torchvision's F.affine with its default fill=None: bilinear grid_sample with zero padding.
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        height, width = [(16, 16), (28, 28), (20, 26)][trial % 3]
        image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)
        angle, scale, dx, dy = (torch.rand(4, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
        angle, scale, shift = 30 * angle, 1 + 0.2 * scale, (4 * dx, 4 * dy)
        expected = F.affine(image, angle=angle, translate=list(shift), scale=scale, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.BILINEAR)
        out = affine_bilinear(image, angle, shift, scale)
        # The two build the same float32 grid by different op orders: a value at exactly .5 may round apart.
        assert (out.int() - expected.int()).abs().max() <= 1
        assert (out != expected).float().mean() < 0.01


def test_whole_pixel_shift_moves_content_and_fills_black() -> None:
    image = _digit_like(1, 16, 16)
    out = affine_bilinear(image, 0.0, (3.0, -2.0), 1.0)
    # Output pixel (y, x) shows input pixel (y + 2, x - 3); the uncovered band is black. No flip.
    assert torch.equal(out[:, :14, 3:], image[:, 2:, :13])
    assert int(out[:, :, :3].max()) == 0 and int(out[:, 14:, :].max()) == 0


def test_invalid_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="affine_degrees"):
        _config(affine_degrees=-1.0)
    with pytest.raises(ValueError, match="affine_translate"):
        _config(affine_translate=1.5)
    with pytest.raises(ValueError, match="affine_scale"):
        _config(affine_scale=(1.1, 0.9))


def test_datamodule_passes_the_ranges_to_its_views(tmp_path) -> None:  # noqa: ANN001
    dm = DigitsDataModule(data_dir=str(tmp_path), affine_degrees=11.0, affine_translate=0.125,
                          affine_scale=[0.9, 1.1], labeled_views=["affine"], unlabeled_views=["test", "affine"])
    assert dm.view_config.affine_scale == (0.9, 1.1)
    view = build_view("affine", dm.view_config)
    assert (view.degrees, view.translate, view.scale) == (11.0, 0.125, (0.9, 1.1))
    dm.setup("fit")
    batch = dm.on_after_batch_transfer({"labeled": next(iter(dm.train_dataloader()["labeled"]))}, 0)
    assert tuple(batch["labeled"].views[0].shape) == (16, 1, 16, 16)
