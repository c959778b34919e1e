"""Augmentation views: shapes, crop geometry, determinism, per-op sanity, Cutout, pickling, and pixel-exact
parity of the fast ops and views with the torchvision calls they replace."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps  # a torchvision dependency; the reference ops are PIL's
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_lightning.data.views import (
    RANDAUG_OPS,
    VIEW_NAMES,
    Cutout,
    RandAugment,
    RandAugOp,
    ViewConfig,
    build_view,
    view_throughput,
)


def _noise(channels: int, size: int, seed: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (channels, size, size), dtype=torch.uint8, generator=generator)


def _seeded(view: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int) -> torch.Tensor:
    # The DataModule's per-sample seeding: a forked global generator set to a known seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return view(image)


@pytest.mark.parametrize("name", VIEW_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32])
def test_views_preserve_shape_and_dtype(name: str, channels: int, size: int) -> None:
    view = build_view(name, ViewConfig(image_size=size, crop_pad=size // 8, hflip=True))
    image = _noise(channels, size)
    for seed in range(5):
        out = _seeded(view, image, seed)
        assert out.dtype == torch.uint8
        assert out.shape == (channels, size, size)


def test_weak_without_pad_or_flip_is_identity() -> None:
    view = build_view("weak", ViewConfig(image_size=16, crop_pad=0, hflip=False))
    image = _noise(3, 16)
    for seed in range(5):
        assert torch.equal(_seeded(view, image, seed), image)


def test_weak_crop_is_a_window_of_the_reflect_padded_image() -> None:
    pad, size = 4, 16
    view = build_view("weak", ViewConfig(image_size=size, crop_pad=pad, hflip=False))
    image = _noise(3, size)
    # NumPy's "reflect" (edge not repeated) is the same mode as torch's, computed independently.
    padded = torch.from_numpy(np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect"))
    offsets = set()
    for seed in range(40):
        out = _seeded(view, image, seed)
        matches = [
            (top, left)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if torch.equal(out, padded[:, top : top + size, left : left + size])
        ]
        assert matches, f"seed {seed}: crop is not a window of the padded image"
        offsets.update(matches)
    # The offset really is random: 40 draws over 81 offsets land on many of them.
    assert len(offsets) > 15


def test_weak_flip_is_random_and_horizontal() -> None:
    view = build_view("weak", ViewConfig(image_size=16, crop_pad=0, hflip=True))
    image = _noise(3, 16)
    outcomes = []
    for seed in range(20):
        out = _seeded(view, image, seed)
        if torch.equal(out, image):
            outcomes.append("same")
        else:
            assert torch.equal(out, image.flip(-1))
            outcomes.append("flipped")
    assert set(outcomes) == {"same", "flipped"}


@pytest.mark.parametrize("name", ["weak", "strong", "randaug"])
def test_views_are_deterministic_under_the_torch_seed(name: str) -> None:
    view = build_view(name, ViewConfig(image_size=32, crop_pad=4, hflip=True))
    image = _noise(3, 32)
    assert torch.equal(_seeded(view, image, 7), _seeded(view, image, 7))
    outputs = [_seeded(view, image, seed) for seed in range(5)]
    distinct = {tuple(out.flatten().tolist()) for out in outputs}
    assert len(distinct) >= 4


def test_strong_view_uses_only_the_torch_generator() -> None:
    # Reseeding Python's and NumPy's generators must not change anything once torch is seeded.
    import random

    view = build_view("strong", ViewConfig(image_size=32, crop_pad=4, hflip=True))
    image = _noise(3, 32)
    random.seed(1)
    np.random.seed(1)
    first = _seeded(view, image, 3)
    random.seed(2)
    np.random.seed(2)
    assert torch.equal(first, _seeded(view, image, 3))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", RANDAUG_OPS, ids=lambda op: op.name)
def test_every_randaug_op_runs_at_its_range_ends(op: RandAugOp, channels: int) -> None:
    image = _noise(channels, 16)
    fill = [0.0] * channels
    for magnitude in (op.low, (op.low + op.high) / 2, op.high):
        out = op.fn(image, magnitude, fill)
        assert out.dtype == torch.uint8
        assert out.shape == image.shape


def test_randaug_op_list_and_ranges_match_the_spec() -> None:
    ranges = {op.name: (op.low, op.high) for op in RANDAUG_OPS}
    enhance = (0.05, 0.95)
    assert ranges == {
        "AutoContrast": (0.0, 1.0),
        "Brightness": enhance,
        "Color": enhance,
        "Contrast": enhance,
        "Equalize": (0.0, 1.0),
        "Identity": (0.0, 1.0),
        "Posterize": (4.0, 8.0),
        "Rotate": (-30.0, 30.0),
        "Sharpness": enhance,
        "ShearX": (-0.3, 0.3),
        "ShearY": (-0.3, 0.3),
        "Solarize": (0.0, 256.0),
        "TranslateX": (-0.3, 0.3),
        "TranslateY": (-0.3, 0.3),
    }


def test_randaug_samples_with_replacement_within_ranges() -> None:
    randaug = RandAugment(num_ops=3)
    torch.manual_seed(0)
    plans = [randaug.sample() for _ in range(2000)]
    assert all(len(plan) == 3 for plan in plans)
    seen = {index for plan in plans for index, _ in plan}
    assert seen == set(range(len(RANDAUG_OPS)))
    # With replacement, the same op appears twice in a plan about 20% of the time (1 - 13·12/14²).
    repeats = sum(len({index for index, _ in plan}) < 3 for plan in plans)
    assert 250 < repeats < 550
    for plan in plans:
        for index, magnitude in plan:
            op = RANDAUG_OPS[index]
            assert op.low <= magnitude <= op.high


def _op(name: str) -> Callable[[torch.Tensor, float, list[float]], torch.Tensor]:
    return next(op.fn for op in RANDAUG_OPS if op.name == name)


def test_posterize_keeps_the_top_bits() -> None:
    image = torch.tensor([0b10110111, 0b00001111, 255, 0], dtype=torch.uint8).view(1, 2, 2)
    out = _op("Posterize")(image, 4.9, [0.0])  # the draw is truncated to 4 bits
    assert out.flatten().tolist() == [0b10110000, 0, 0b11110000, 0]


def test_solarize_inverts_from_the_threshold_up() -> None:
    image = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 2, 2)
    solarize = _op("Solarize")
    assert solarize(image, 128.0, [0.0]).flatten().tolist() == [0, 127, 127, 0]
    assert solarize(image, 127.5, [0.0]).flatten().tolist() == [0, 127, 127, 0]
    assert torch.equal(solarize(image, 0.0, [0.0]), 255 - image)
    assert torch.equal(solarize(image, 255.9, [0.0]), image)


def test_equalize_and_autocontrast_stretch_a_narrow_ramp() -> None:
    # 32 grey levels 100..131, each covering one row: a low-contrast, evenly populated histogram.
    ramp = torch.arange(100, 132, dtype=torch.uint8).view(32, 1).expand(32, 32)
    image = torch.stack([ramp, ramp, ramp])
    for name in ("Equalize", "AutoContrast"):
        out = _op(name)(image, 0.5, [0.0, 0.0, 0.0])
        levels = out[0, :, 0]
        assert int(levels.min()) <= 8 and int(levels.max()) >= 240, name
        # Equalize may saturate the top levels (as PIL's does), so the order is kept only weakly.
        assert bool((levels[1:] >= levels[:-1]).all()), f"{name} must keep the order of grey levels"
        assert len(levels.unique()) >= 24, name
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_color_is_identity_on_one_channel_images() -> None:
    image = _noise(1, 16)
    assert torch.equal(_op("Color")(image, 0.1, [0.0]), image)


def test_geometric_ops_fill_uncovered_pixels() -> None:
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    fill = [7.0, 8.0, 9.0]
    out = _op("TranslateX")(image, 0.25, fill)  # moves the content 4 px left
    assert out[:, :, :12].eq(200).all()
    assert out[:, :, 12:].eq(torch.tensor([7, 8, 9], dtype=torch.uint8).view(3, 1, 1)).all()
    rotated = _op("Rotate")(image, 30.0, fill)
    assert rotated[:, 0, 0].tolist() == [7, 8, 9]  # a corner is uncovered by any 30° rotation


# The TorchSSL ops written with PIL, for parity: (PIL image, magnitude) -> PIL image.
_PIL_REFERENCE = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}
# Ops whose PIL version rounds differently (integer grey conversion, integer mean, cut-off rounding).
_OFF_BY_ONE = {"AutoContrast", "Color", "Contrast"}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", RANDAUG_OPS, ids=lambda op: op.name)
def test_randaug_ops_match_the_pil_reference(op: RandAugOp, channels: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for trial in range(8):
        image = torch.randint(0, 256, (channels, 32, 32), dtype=torch.uint8, generator=generator)
        if trial % 2:
            # A smooth image too: noise alone hides errors in ops that depend on neighbourhoods.
            image = torch.nn.functional.avg_pool2d(image.float()[None], 5, 1, 2)[0].round().to(torch.uint8)
        magnitude = op.low + (op.high - op.low) * float(torch.rand((), generator=generator))
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[:, :, 0] if channels == 1 else array)
        expected = np.asarray(_PIL_REFERENCE[op.name](pil, magnitude)).reshape(32, 32, channels)
        expected = torch.from_numpy(expected.copy()).permute(2, 0, 1)
        diff = (op.fn(image, magnitude, [0.0] * channels).int() - expected.int()).abs()
        if op.name == "Rotate":
            # Nearest sampling breaks ties differently at a few pixel-centre boundaries.
            assert diff.eq(0).float().mean() >= 0.99
        elif op.name in _OFF_BY_ONE:
            assert int(diff.max()) <= 1
        else:
            assert int(diff.max()) == 0, f"{op.name} at {magnitude:.3f}"


def _cutout_box(image: torch.Tensor, out: torch.Tensor, fill: torch.Tensor) -> tuple[int, int]:
    """Check ``out`` is ``image`` with one axis-aligned rectangle of ``fill``; return its (h, w)."""
    changed = (out != image).any(0)
    filled = out.eq(fill.view(-1, 1, 1)).all(0)
    assert bool((changed <= filled).all()), "a changed pixel does not hold the fill value"
    if not filled.any():
        return 0, 0
    rows, cols = filled.any(1), filled.any(0)
    assert torch.equal(filled, rows[:, None] & cols[None, :]), "the filled region is not a rectangle"
    assert torch.equal(out[:, ~filled], image[:, ~filled])
    return int(rows.sum()), int(cols.sum())


@pytest.mark.parametrize("channels", [1, 3])
def test_cutout_fills_one_square_and_leaves_the_rest(channels: int) -> None:
    size = 32
    # Values below 100 never equal the grey fill, so the filled pixels are exactly the box.
    image = _noise(channels, size, high=100)
    cutout = Cutout(0.5, (125, 123, 114))
    fill = torch.tensor([125, 123, 114] if channels == 3 else [121], dtype=torch.uint8)
    sides = []
    for seed in range(200):
        out = _seeded(cutout, image, seed)
        height, width = _cutout_box(image, out, fill)
        assert height <= size // 2 and width <= size // 2
        sides.append(max(height, width))
    assert max(sides) >= 12  # large boxes do occur (the side is uniform up to half the image)


def test_cutout_box_is_square_away_from_the_border() -> None:
    cutout = Cutout(0.5)
    for seed in range(200):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, bottom, right = cutout.sample(32, 32)
        if top > 0 and left > 0 and bottom < 32 and right < 32:
            assert bottom - top == right - left


def test_strong_without_cutout_or_ops_is_weak() -> None:
    config = ViewConfig(image_size=16, crop_pad=2, hflip=True, randaug_ops=0, cutout=0.0)
    image = _noise(3, 16)
    weak, strong = build_view("weak", config), build_view("strong", config)
    for seed in range(5):
        assert torch.equal(_seeded(weak, image, seed), _seeded(strong, image, seed))


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_views_survive_pickling(name: str) -> None:
    view = build_view(name, ViewConfig(image_size=32, crop_pad=4, hflip=True))
    clone = pickle.loads(pickle.dumps(view))
    image = _noise(3, 32)
    assert torch.equal(_seeded(view, image, 11), _seeded(clone, image, 11))


def test_unknown_view_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown view 'medium'.*weak.*strong"):
        build_view("medium", ViewConfig(image_size=32, crop_pad=4, hflip=True))


def test_view_rejects_non_uint8_images() -> None:
    view = build_view("weak", ViewConfig(image_size=16, crop_pad=2, hflip=False))
    with pytest.raises(ValueError, match="uint8"):
        view(torch.rand(3, 16, 16))


def test_view_throughput_reports_a_rate_and_keeps_the_caller_rng() -> None:
    torch.manual_seed(5)
    state = torch.get_rng_state()
    rate = view_throughput(
        "strong", ViewConfig(image_size=16, crop_pad=2, hflip=False), n_images=20, channels=1
    )
    assert rate > 0
    assert torch.equal(torch.get_rng_state(), state)


# ----- parity with torchvision ----------------------------------------------------------------------
# Equalize, Sharpness, the geometric ops and the weak view are written as short runs of tensor ops for
# speed; they must give exactly what the torchvision calls they replace give. The references below are
# the views as first written on torchvision.transforms.v2.functional, argument for argument.


def _reference_shear(image: torch.Tensor, shear_x: float, shear_y: float, fill: list[float]) -> torch.Tensor:
    return F.affine(
        image,
        angle=0.0,
        translate=[0.0, 0.0],
        scale=1.0,
        shear=[math.degrees(math.atan(shear_x)), math.degrees(math.atan(shear_y))],
        interpolation=InterpolationMode.NEAREST,
        fill=fill,
        center=[0.0, 0.0],
    )


def _reference_translate(image: torch.Tensor, dx: float, dy: float, fill: list[float]) -> torch.Tensor:
    return F.affine(
        image,
        angle=0.0,
        translate=[-dx, -dy],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
        fill=fill,
    )


_Op = Callable[[torch.Tensor, float, list[float]], torch.Tensor]
_TORCHVISION_REFERENCE: dict[str, _Op] = {
    "AutoContrast": lambda im, v, fill: F.autocontrast(im),
    "Brightness": lambda im, v, fill: F.adjust_brightness(im, v),
    "Color": lambda im, v, fill: F.adjust_saturation(im, v),
    "Contrast": lambda im, v, fill: F.adjust_contrast(im, v),
    "Equalize": lambda im, v, fill: F.equalize(im),
    "Identity": lambda im, v, fill: im,
    "Posterize": lambda im, v, fill: F.posterize(im, max(1, int(v))),
    "Rotate": lambda im, v, fill: F.rotate(im, v, interpolation=InterpolationMode.NEAREST, fill=fill),
    "Sharpness": lambda im, v, fill: F.adjust_sharpness(im, v),
    "ShearX": lambda im, v, fill: _reference_shear(im, v, 0.0, fill),
    "ShearY": lambda im, v, fill: _reference_shear(im, 0.0, v, fill),
    "Solarize": lambda im, v, fill: im if v > 255 else F.solarize(im, v),
    "TranslateX": lambda im, v, fill: _reference_translate(im, v * im.shape[-1], 0.0, fill),
    "TranslateY": lambda im, v, fill: _reference_translate(im, 0.0, v * im.shape[-2], fill),
}

# Black (the geometric fill RandAugment uses), one grey value, and a colour (mean grey for 1 channel).
_FILLS = ([0.0, 0.0, 0.0], [90.0, 90.0, 90.0], [37.0, 150.0, 220.0])


def _fill(kind: int, channels: int) -> list[float]:
    fill = _FILLS[kind % len(_FILLS)]
    return fill if channels == 3 else [float(round(sum(fill) / 3))]


def _varied_image(
    channels: int, height: int, width: int, kind: int, generator: torch.Generator
) -> torch.Tensor:
    """A test image of one of five kinds, as a non-contiguous crop (as the weak view returns).

    Noise alone would miss the corner cases: smooth images for neighbourhood ops, few grey levels and
    flat channels for Equalize's and AutoContrast's special cases, a narrow range for the stretches.
    """
    image = torch.randint(0, 256, (channels, height + 3, width + 2), dtype=torch.uint8, generator=generator)
    kind %= 5
    if kind == 1:
        image = torch.nn.functional.avg_pool2d(image.float()[None], 5, 1, 2)[0].round().to(torch.uint8)
    elif kind == 2:
        image = image // 64 * 60 + 10
    elif kind == 3:
        image[0] = int(torch.randint(0, 256, (), generator=generator))
    elif kind == 4:
        image = image // 16 + 100
    return image[:, 2 : 2 + height, 1 : 1 + width]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", RANDAUG_OPS, ids=lambda op: op.name)
def test_randaug_ops_equal_torchvision(op: RandAugOp, channels: int) -> None:
    generator = torch.Generator().manual_seed(2024 + channels)
    reference = _TORCHVISION_REFERENCE[op.name]
    for trial in range(200):
        size = (16, 28, 32, 96)[trial % 4]
        image = _varied_image(channels, size, size, trial, generator)
        # The range ends first, then uniform draws.
        u = (
            (0.0, 1.0)[trial]
            if trial < 2
            else float(torch.rand((), dtype=torch.float64, generator=generator))
        )
        magnitude = op.low + (op.high - op.low) * u
        fill = _fill(trial, channels)
        out = op.fn(image, magnitude, fill)
        expected = reference(image, magnitude, fill)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert torch.equal(out, expected), (
            f"{op.name} at {magnitude!r} on {tuple(image.shape)} (trial {trial}, fill {fill}): "
            f"{int((out != expected).sum())} pixels differ"
        )


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Sharpness"])
def test_randaug_ops_equal_torchvision_on_non_square_images(name: str) -> None:
    generator = torch.Generator().manual_seed(5)
    op = next(op for op in RANDAUG_OPS if op.name == name)
    for trial, (height, width) in enumerate([(20, 28), (28, 20), (17, 31), (3, 40), (40, 3)] * 8):
        channels = 1 + 2 * (trial % 2)
        image = _varied_image(channels, height, width, trial, generator)
        magnitude = op.low + (op.high - op.low) * float(
            torch.rand((), dtype=torch.float64, generator=generator)
        )
        fill = _fill(trial, channels)
        assert torch.equal(
            op.fn(image, magnitude, fill), _TORCHVISION_REFERENCE[name](image, magnitude, fill)
        )


def test_translations_equal_torchvision_near_half_pixel_distances() -> None:
    # Distances near k + 1/2 are where the whole-pixel shortcut must hand over to the warp: float32
    # error and round-half-to-even may then split the image between two shifts.
    from ssl_lightning.data.views import _whole_pixel_shift

    generator = torch.Generator().manual_seed(9)
    handed_over = 0
    for size in (16, 28, 32, 96):
        for k in range(-int(0.3 * size), int(0.3 * size) + 1, 1 + size // 32):
            for delta in (0.0, 1e-7, -1e-6, 3e-5, -1e-3, 0.01):
                v = (k + 0.5 + delta) / size
                handed_over += _whole_pixel_shift(v * size, size) is None
                channels = 1 + 2 * (k % 2)
                image = _varied_image(channels, size, size, k, generator)
                fill = _fill(k, channels)
                expected_x = _reference_translate(image, v * size, 0.0, fill)
                expected_y = _reference_translate(image, 0.0, v * size, fill)
                assert torch.equal(_op("TranslateX")(image, v, fill), expected_x), (size, v)
                assert torch.equal(_op("TranslateY")(image, v, fill), expected_y), (size, v)
    assert handed_over > 0


@pytest.mark.parametrize("degrees", [0.0, 90.0, 180.0, 270.0, -90.0, 360.0, 45.0, -180.0])
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 20, 28)])
def test_rotate_equals_torchvision_at_quarter_turns(degrees: float, shape: tuple[int, int, int]) -> None:
    image = _varied_image(shape[0], shape[1], shape[2], 0, torch.Generator().manual_seed(3))
    fill = _fill(2, shape[0])
    expected = F.rotate(image, degrees, interpolation=InterpolationMode.NEAREST, fill=fill)
    assert torch.equal(_op("Rotate")(image, degrees, fill), expected)


@pytest.mark.parametrize("factor", [0.0, 0.05, 0.5, 1.0, 1.5, 4.0])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (1, 2, 5), (3, 5, 2), (1, 3, 3)])
def test_sharpness_equals_torchvision_beyond_randaugment_range(
    factor: float, shape: tuple[int, int, int]
) -> None:
    # Factors above 1 sharpen and need the clamp that the blend skips for [0, 1]; images of 2 px or less
    # across have no interior and stay as they are.
    generator = torch.Generator().manual_seed(4)
    for kind in range(5):
        image = _varied_image(shape[0], shape[1], shape[2], kind, generator)
        assert torch.equal(_op("Sharpness")(image, factor, []), F.adjust_sharpness(image, factor))


def _reference_weak(image: torch.Tensor, config: ViewConfig) -> torch.Tensor:
    """The weak view as first written: torchvision flip and reflect pad, then a crop."""
    if config.hflip and float(torch.rand(())) < 0.5:
        image = F.horizontal_flip(image)
    if config.crop_pad > 0:
        image = F.pad(image, [config.crop_pad], padding_mode="reflect")
    height, width = image.shape[-2:]
    size = config.image_size
    if height == size and width == size:
        return image
    offsets = torch.randint(0, 1 << 30, (2,)).tolist()
    top, left = offsets[0] % (height - size + 1), offsets[1] % (width - size + 1)
    return image[:, top : top + size, left : left + size]


def _reference_strong(image: torch.Tensor, config: ViewConfig) -> torch.Tensor:
    """The strong view as first written: reference weak view, torchvision ops, Cutout's fill per call."""
    image = _reference_weak(image, config)
    channels = image.shape[0]
    for index, magnitude in RandAugment(config.randaug_ops).sample():
        image = _TORCHVISION_REFERENCE[RANDAUG_OPS[index].name](image, magnitude, [0.0] * channels)
    top, left, bottom, right = Cutout(config.cutout, config.mean_fill).sample(*image.shape[-2:])
    if bottom > top and right > left:
        grey = list(config.mean_fill) if channels == 3 else [round(sum(config.mean_fill) / 3)]
        image = image.clone()
        image[:, top:bottom, left:right] = torch.tensor(grey, dtype=torch.uint8).view(-1, 1, 1)
    return image


def _seeded_with_state(
    view: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = view(image)
        return out, torch.get_rng_state()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("height", "width", "config"),
    [
        (16, 16, ViewConfig(image_size=16, crop_pad=2, hflip=True)),
        (28, 28, ViewConfig(image_size=28, crop_pad=0, hflip=True)),
        (28, 28, ViewConfig(image_size=24, crop_pad=0, hflip=False)),
        (32, 32, ViewConfig(image_size=32, crop_pad=4, hflip=False)),
        (20, 26, ViewConfig(image_size=24, crop_pad=3, hflip=True)),
        (96, 96, ViewConfig(image_size=96, crop_pad=12, hflip=True)),
    ],
)
def test_weak_and_strong_views_equal_the_torchvision_reference(
    channels: int, height: int, width: int, config: ViewConfig
) -> None:
    # Same pixels and the same draws from the global generator, so the generator ends in the same state.
    generator = torch.Generator().manual_seed(6)
    weak, strong = build_view("weak", config), build_view("strong", config)
    for seed in range(40):
        image = _varied_image(channels, height, width, seed, generator)
        for view, reference in ((weak, _reference_weak), (strong, _reference_strong)):
            out, state = _seeded_with_state(view, image, seed)
            expected, expected_state = _seeded_with_state(partial(reference, config=config), image, seed)
            assert torch.equal(out, expected), (view, seed)
            assert torch.equal(state, expected_state), (view, seed)
