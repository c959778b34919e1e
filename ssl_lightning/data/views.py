"""Augmentation views on ``uint8`` image tensors of shape ``(C, H, W)``, ``C`` in ``{1, 3}``.

A *view* is a picklable callable ``Tensor -> Tensor`` built by name from a :class:`ViewConfig`:

- ``test`` / ``identity``: the image unchanged (evaluation images are already at the model's size).
- ``weak``: random horizontal flip (when enabled), then reflect padding and a random crop back to
  ``image_size``.
- ``randaug``: ``weak``, then :class:`RandAugment`.
- ``strong``: ``weak``, then :class:`RandAugment`, then :class:`Cutout`.
- ``resized_crop``: a random-resized crop (area 20–100%, aspect 3/4–4/3) to ``image_size`` and a
  random horizontal flip (ImageNet weak view of MoCo-style recipes, e.g. SimMatch's).
- ``moco_strong``: an independent ``resized_crop``, then colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8,
  grayscale with p = 0.2 and a Gaussian blur (σ ∈ [0.1, 2], kernel ≈ 10% of the side) with p = 0.5
  (MoCo v2's augmentation).
- ``affine``: a random rotation, scaling and translation about the centre (ranges from the config;
  by default ±15°, 0.9–1.1, ±10% of the side), bilinear, black fill, no flip (the MNIST view of the
  collision-clustering spec).

RandAugment follows the TorchSSL/USB variant that the specs reference (infomatch §5.1, bhattacharyya
§5.4): ``num_ops`` ops drawn *with replacement* from a fixed 14-op list, each at a magnitude drawn
uniformly from its own range (there is no global magnitude knob). Each op is written to match what the
PIL op in that code does; the comments on the ops say where we depart from it and why.

All randomness comes from the torch global generator (``torch.rand`` / ``torch.randint``): the
DataModule seeds every sample draw by forking that generator, so Python's ``random`` or NumPy would
escape the seeding and break reproducibility.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

#: Cutout's grey, as TorchSSL/USB draw it (roughly the CIFAR-10 pixel mean).
CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
#: Fill of the pixels that Rotate/Shear/Translate uncover. TorchSSL calls PIL's ``rotate`` and
#: ``transform`` without ``fillcolor``, so those pixels are black; we keep that (the spec calls this
#: "the TorchSSL RandAugment" and is silent on the geometric fill).
GEOMETRIC_FILL: tuple[int, int, int] = (0, 0, 0)

VIEW_NAMES: tuple[str, ...] = (
    "test", "identity", "weak", "randaug", "strong", "resized_crop", "moco_strong", "affine",
)


def _fill_for(fill: tuple[int, ...], channels: int) -> list[float]:
    """The per-channel fill for an image with ``channels`` channels.

    A 1-channel image gets the rounded mean of an RGB fill, so a grey fill stays the same grey.
    """
    if len(fill) == channels:
        return [float(v) for v in fill]
    if len(fill) == 1:
        return [float(fill[0])] * channels
    if channels == 1:
        return [float(round(sum(fill) / len(fill)))]
    raise ValueError(f"a fill of {len(fill)} values does not fit an image with {channels} channels")


def _check_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"views expect a uint8 (C, H, W) tensor with C in {{1, 3}}, got {image.dtype} {tuple(image.shape)}"
        )


# ----- the 14 RandAugment ops --------------------------------------------------------------------------
# Every op takes (image, magnitude, geometric fill) so RandAugment can call them uniformly; ops without
# a magnitude ignore it. ``F`` is torchvision.transforms.v2.functional; each op's docstring names the
# call whose output it equals.
#
# The ops run once per image in DataLoader workers. Those that torchvision does in a few cheap tensor
# ops call it. Equalize, Sharpness and the geometric ops are rewritten, because torchvision's versions
# cost 100-450 µs a call at 16-32 px, mostly per-op overhead (grid building, a mask channel, dtype round
# trips, a grouped convolution). The rewrites give the same pixels, not just close ones
# (tests/data/test_views.py checks each against torchvision): wherever the result hinges on float32
# rounding, they run the same float32 operations in the same order on tensors of the same layout.


_STRUCT_FORMATS = {torch.float32: "f", torch.int64: "q"}


def _small_tensor(values: Sequence[float], dtype: torch.dtype) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` for a short 1-d list, float32 or int64.

    Built from a packed buffer, which costs a fraction of ``torch.tensor`` on a list; some ops build
    one on every call. Packing rounds floats to float32 to nearest, as ``torch.tensor`` does.
    """
    packed = struct.pack(f"{len(values)}{_STRUCT_FORMATS[dtype]}", *values)
    return torch.frombuffer(bytearray(packed), dtype=dtype)


# 0-d operands for hot elementwise ops: a Python number is wrapped into a tensor on every call.
_SIX = torch.tensor(6.0)
_THIRTEEN = torch.tensor(13.0)


class _Fill(NamedTuple):
    """A fill colour as ``(C, 1, 1)`` uint8 pixels, and its single value when all channels agree."""

    pixel: Tensor
    value: int | None


_FILLS: dict[tuple[float, ...], _Fill] = {}


def _fill_pixels(fill: Sequence[float]) -> _Fill:
    """``fill`` rounded to uint8 as torchvision rounds its float result; cached, as fills are few."""
    key = tuple(fill)
    cached = _FILLS.get(key)
    if cached is None:
        if not all(0 <= v <= 255 for v in key):
            raise ValueError(f"fill values must lie in [0, 255], got {list(key)}")
        pixel = torch.tensor(key, dtype=torch.float32).round_().to(torch.uint8).view(-1, 1, 1)
        values = set(pixel.flatten().tolist())
        cached = _Fill(pixel, values.pop() if len(values) == 1 else None)
        _FILLS[key] = cached
    return cached


def _filled(channels: int, height: int, width: int, fill: Sequence[float]) -> Tensor:
    """A new ``(channels, height, width)`` uint8 image of the fill colour."""
    pixels = _fill_pixels(fill)
    if pixels.value is not None:
        return torch.full((channels, height, width), pixels.value, dtype=torch.uint8)
    return pixels.pixel.expand(channels, height, width).contiguous()


# -- ops torchvision already does cheaply --


def _auto_contrast(image: Tensor, _: float, __: list[float]) -> Tensor:
    """``F.autocontrast(image)``."""
    return F.autocontrast(image)


def _brightness(image: Tensor, factor: float, _: list[float]) -> Tensor:
    """``F.adjust_brightness(image, factor)``."""
    return F.adjust_brightness(image, factor)


def _color(image: Tensor, factor: float, _: list[float]) -> Tensor:
    """``F.adjust_saturation(image, factor)``."""
    # torchvision returns a 1-channel image unchanged here, as PIL's Color enhance does for "L" images.
    return F.adjust_saturation(image, factor)


def _contrast(image: Tensor, factor: float, _: list[float]) -> Tensor:
    """``F.adjust_contrast(image, factor)``."""
    return F.adjust_contrast(image, factor)


def _identity(image: Tensor, _: float, __: list[float]) -> Tensor:
    """The image unchanged."""
    return image


def _posterize(image: Tensor, bits: float, _: list[float]) -> Tensor:
    """``F.posterize(image, max(1, int(bits)))``."""
    # TorchSSL truncates the uniform draw, so bits is 4..7 (8, a no-op, has probability zero).
    return F.posterize(image, max(1, int(bits)))


def _solarize(image: Tensor, threshold: float, _: list[float]) -> Tensor:
    """``F.solarize(image, threshold)``, and the image unchanged for a threshold above 255."""
    # PIL inverts pixels >= threshold; a threshold above 255 (the range reaches 256) inverts nothing,
    # and torchvision rejects thresholds above the dtype's maximum, so that case is handled here.
    if threshold > 255:
        return image
    return F.solarize(image, threshold)


# -- Equalize and Sharpness --


def _equalize(image: Tensor, _: float, __: list[float]) -> Tensor:
    """``F.equalize(image)``: PIL's histogram equalisation, per channel.

    PIL's lookup table is ``lut[k] = (cum[k - 1] + step // 2) // step``, ``cum`` the cumulative
    histogram and ``step`` the number of pixels below the channel's top level over 255; a channel with
    ``step == 0`` is left as is. ``cum[k - 1]`` is computed as ``cum[k] - hist[k]``, which saves a
    shifted copy, and all channels share one histogram and one table, offset by 256 per channel.
    """
    channels = image.shape[0]
    flat = image.reshape(channels, -1)
    levels = (flat.long() if channels == 1 else flat + _CHANNEL_OFFSETS[:channels]).view(-1)
    hist = torch.bincount(levels, minlength=256 * channels).view(channels, 256)
    cum = hist.cumsum(1)
    # The first bin where the cumulative count peaks is the channel's top level.
    top_counts = hist.gather(1, cum.argmax(1, keepdim=True)).view(-1).tolist()
    steps = [(flat.shape[1] - count) // 255 for count in top_counts]
    if not any(steps):
        return image
    constants = [step // 2 for step in steps] + [max(step, 1) for step in steps]
    halves, divisors = _small_tensor(constants, torch.int64).view(2, channels, 1)
    lut = cum.sub_(hist).add_(halves).div_(divisors, rounding_mode="floor").clamp_(max=255)
    if not all(steps):
        unchanged = torch.tensor([step == 0 for step in steps]).view(channels, 1)
        lut = torch.where(unchanged, _IDENTITY_LUT, lut)
    return lut.to(torch.uint8).view(-1).index_select(0, levels).view_as(image)


# Where each channel's 256 bins start in the shared histogram (int64, so adding them to uint8 levels
# gives int64 indices), and the lookup table of a channel left as is.
_CHANNEL_OFFSETS = torch.arange(3).mul_(256).view(3, 1)
_IDENTITY_LUT = torch.arange(256)


def _sharpness(image: Tensor, factor: float, _: list[float]) -> Tensor:
    """``F.adjust_sharpness(image, factor)``: blend the interior with PIL's SMOOTH filter.

    torchvision convolves with the float32 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 and rounds. The
    exact value t / 13, with t the 3x3 sum plus 4 times the centre (an integer), is never within 1/26
    of a half-integer, far beyond float32 error, so ``(t + 6) // 13`` from exact integer sums rounds it
    identically, at a fraction of a grouped convolution's cost.
    """
    height, width = image.shape[-2:]
    if height <= 2 or width <= 2:
        return image  # torchvision leaves images without an interior unchanged
    output = image.to(torch.float32)
    interior = output[:, 1:-1, 1:-1]
    # Two 3-tap sums; integer-valued float32 sums below 2**24 are exact.
    box = output.unfold(2, 3, 1).sum(-1).unfold(1, 3, 1).sum(-1)
    # floor((t + 6) / 13) in float32 is exact: t + 6 < 2**24 and a quotient that is not an integer is
    # at least 1/13 away from one.
    blurred = box.add_(interior, alpha=4).add_(_SIX).div_(_THIRTEEN).floor_()
    # torchvision's blend x + (1 - factor) * (blurred - x), the same in-place ops on the same strided
    # view: the truncation to uint8 below turns a last-bit difference into a grey level.
    interior.add_(blurred.sub_(interior), alpha=1.0 - factor)
    if not 0.0 <= factor <= 1.0:
        # Only sharpening (factor > 1) can leave [0, 255]; for factor in [0, 1], as RandAugment draws,
        # the blend is a convex combination and float rounding cannot cross 0 or 255.
        output.clamp_(0, 255)
    return output.to(torch.uint8)


# -- geometric ops: one nearest-neighbour warp, and a shift for translations --


def _inverse_affine_matrix(
    center: tuple[float, float], angle: float, translate: tuple[float, float], shear: tuple[float, float]
) -> list[float]:
    """The output-to-input pixel map ``[a, b, c, d, e, f]`` that torchvision builds for an affine warp.

    Coordinates are relative to the image centre; the scale is 1. These are the float64 operations of
    torchvision's ``_get_inverse_affine_matrix`` in the same order, so the float32 sampling grid built
    from the matrix is the same to the last bit.
    """
    rot = math.radians(angle)
    shear_x, shear_y = math.radians(shear[0]), math.radians(shear[1])
    cos_sy, tan_sx = math.cos(shear_y), math.tan(shear_x)
    # The forward map R(angle) · ShearY · ShearX, whose determinant is 1 ...
    a = math.cos(rot - shear_y) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - shear_y) / cos_sy
    d = math.cos(rot) - c * tan_sx
    # ... inverted, and conjugated by the centre after the inverse translation.
    inverse = [d, -b, -c, a]
    shifted_x, shifted_y = center[0] + translate[0], center[1] + translate[1]
    offset_x = center[0] - inverse[0] * shifted_x - inverse[1] * shifted_y
    offset_y = center[1] - inverse[2] * shifted_x - inverse[3] * shifted_y
    return [inverse[0], inverse[1], offset_x, inverse[2], inverse[3], offset_y]


_PIXEL_CENTRES: dict[tuple[int, int], Tensor] = {}


def _pixel_centres(height: int, width: int) -> Tensor:
    """``(1, H*W, 3)``: each pixel's centre relative to the image centre, then a 1; cached per size.

    Built as torchvision's ``_affine_grid`` builds its base grid, so that the bmm in
    :func:`_warp_nearest` multiplies the same numbers.
    """
    centres = _PIXEL_CENTRES.get((height, width))
    if centres is None:
        centres = torch.empty(1, height, width, 3, dtype=torch.float32)
        centres[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width))
        centres[..., 1].copy_(
            torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height).unsqueeze_(-1)
        )
        centres[..., 2].fill_(1)
        centres = centres.view(1, height * width, 3)
        _PIXEL_CENTRES[(height, width)] = centres
    return centres


def _normalised_theta(matrix: list[float], height: int, width: int) -> Tensor:
    """torchvision's ``theta.transpose(1, 2).div_([W/2, H/2])`` for ``theta = float32(matrix)``.

    The float32 quotients are computed in Python: the quotient of two float32 numbers, computed in
    float64 and rounded once to float32, is the correctly rounded float32 quotient that torch's division
    gives. The result is the same ``(1, 3, 2)`` transposed view, so the bmm makes the same BLAS call.
    """
    m = struct.unpack("6f", struct.pack("6f", *matrix))  # float32(matrix), as torch.tensor rounds it
    half_width, half_height = 0.5 * width, 0.5 * height
    scaled = [v / half_width for v in m[:3]] + [v / half_height for v in m[3:]]
    return _small_tensor(scaled, torch.float32).view(1, 2, 3).transpose(1, 2)


def _warp_nearest(image: Tensor, matrix: list[float], fill: list[float]) -> Tensor:
    """``image`` resampled through ``matrix`` (see :func:`_inverse_affine_matrix`), nearest pixel.

    What torchvision's tensor ``affine``/``rotate`` with NEAREST interpolation and a fill compute: the
    same float32 sampling grid goes through the same ``grid_sample`` call. torchvision samples an
    extra all-ones channel to find the pixels to fill; here the fill is subtracted before sampling and
    added back after, so the zeros that grid_sample returns outside the image become the fill (exact,
    as all values are small integers), and for the usual black fill there is nothing to do.
    """
    channels, height, width = image.shape
    grid = _pixel_centres(height, width).bmm(_normalised_theta(matrix, height, width))
    fill_value = _fill_pixels(fill).value
    source = image.to(torch.float32)
    if fill_value != 0:
        fill_float = _fill_pixels(fill).pixel.to(torch.float32)
        source = source.sub_(fill_float)
    warped = torch.nn.functional.grid_sample(
        source.unsqueeze(0),
        grid.view(1, height, width, 2),
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    ).view(channels, height, width)
    if fill_value != 0:
        warped = warped.add_(fill_float)
    return warped.to(torch.uint8)


def _rotate(image: Tensor, degrees: float, fill: list[float]) -> Tensor:
    """``F.rotate(image, degrees, NEAREST, fill=fill)``: counter-clockwise about the centre, as PIL's
    ``Image.rotate``."""
    angle = degrees % 360
    # torchvision's shortcuts for exact quarter turns (of which only 0 is in RandAugment's range).
    if angle == 0:
        return image.clone()
    if angle == 180:
        return torch.rot90(image, k=2, dims=(-2, -1))
    if angle in (90, 270) and image.shape[-1] == image.shape[-2]:
        return torch.rot90(image, k=1 if angle == 90 else 3, dims=(-2, -1))
    return _warp_nearest(image, _inverse_affine_matrix((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0)), fill)


def _shear(image: Tensor, shear_x: float, shear_y: float, fill: list[float]) -> Tensor:
    """``F.affine`` with angle 0, translate 0, scale 1, shear ``atan`` of ``shear_x``/``shear_y`` in
    degrees, NEAREST, ``fill`` and ``center=[0, 0]``."""
    # PIL's affine (1, v, 0, 0, 1, 0) shears about the top-left corner, not the centre, so the sheared
    # image also drifts sideways by up to v*H; centre=[0, 0] and angle atan(v) reproduce that exactly.
    height, width = image.shape[-2:]
    matrix = _inverse_affine_matrix(
        (0.0 - width * 0.5, 0.0 - height * 0.5),  # torchvision's centre [0, 0], relative to the middle
        0.0,
        (0.0, 0.0),
        (math.degrees(math.atan(shear_x)), math.degrees(math.atan(shear_y))),
    )
    return _warp_nearest(image, matrix, fill)


def _shear_x(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _shear(image, v, 0.0, fill)


def _shear_y(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _shear(image, 0.0, v, fill)


#: A translation by a distance d at least this far from a half pixel (times image size plus |d|) is
#: done as a whole-pixel shift. In the warp, a pixel's float32 source coordinate i + d comes out of
#: seven float32 roundings of values at most size + |d| pixels in magnitude, so it is off by less than
#: 7 * 2**-24 * (size + |d|) < 5e-7 * (size + |d|); the margin is 20 times that.
_SHIFT_MARGIN = 1e-5


def _whole_pixel_shift(distance: float, size: int) -> int | None:
    """``round(distance)`` if the warp provably sends every pixel i to source i + ``round(distance)``.

    Near a half pixel, float32 error and round-half-to-even can split the rows or columns between two
    shifts; those distances give None and go through the warp.
    """
    nearest = math.floor(distance + 0.5)
    if abs(distance - nearest) <= 0.5 - _SHIFT_MARGIN * (size + abs(distance)):
        return nearest
    return None


def _shift(image: Tensor, dx: int, dy: int, fill: list[float]) -> Tensor:
    """``out[:, i, j] = image[:, i + dy, j + dx]`` where that lies in the image, else the fill."""
    channels, height, width = image.shape
    if abs(dx) >= width or abs(dy) >= height:
        return _filled(channels, height, width, fill)
    fill_value = _fill_pixels(fill).value
    if fill_value is not None:
        # Negative padding crops: this drops dx columns on one side and adds dx of fill on the other.
        return torch.nn.functional.pad(image, (-dx, dx, -dy, dy), value=float(fill_value))
    out = _filled(channels, height, width, fill)
    out[:, max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)] = image[
        :, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)
    ]
    return out


def _translate(image: Tensor, dx: float, dy: float, fill: list[float]) -> Tensor:
    """``F.affine(image, angle=0, translate=[-dx, -dy], scale=1, shear=[0, 0], NEAREST, fill=fill)``.

    Output pixel (x, y) reads input pixel (x + dx, y + dy), rounded. Nearly always that is the same
    whole-pixel offset for every pixel, and then a shift does it for a fraction of the warp's cost.
    """
    # PIL's affine (1, 0, v, 0, 1, 0) samples input x + v, i.e. moves the content by -v; the range is
    # symmetric so the sign only matters for matching the reference op for op.
    height, width = image.shape[-2:]
    shift_x, shift_y = _whole_pixel_shift(dx, width), _whole_pixel_shift(dy, height)
    if shift_x is not None and shift_y is not None:
        return _shift(image, shift_x, shift_y, fill)
    return _warp_nearest(image, _inverse_affine_matrix((0.0, 0.0), 0.0, (-dx, -dy), (0.0, 0.0)), fill)


def _translate_x(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _translate(image, v * image.shape[-1], 0.0, fill)


def _translate_y(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _translate(image, 0.0, v * image.shape[-2], fill)


class RandAugOp(NamedTuple):
    """One RandAugment op and the range its magnitude is drawn from, uniformly."""

    name: str
    fn: Callable[[Tensor, float, list[float]], Tensor]
    low: float
    high: float


# Enhance factors lie in [0.05, 0.95] and are passed to the op as is (PIL's ``enhance(v)``), as in
# TorchSSL/USB and the spec: these ops only ever darken, desaturate, flatten or blur. Other RandAugment
# variants map the magnitude to 1 ± v; that is not what the referenced code does.
RANDAUG_OPS: tuple[RandAugOp, ...] = (
    RandAugOp("AutoContrast", _auto_contrast, 0.0, 1.0),
    RandAugOp("Brightness", _brightness, 0.05, 0.95),
    RandAugOp("Color", _color, 0.05, 0.95),
    RandAugOp("Contrast", _contrast, 0.05, 0.95),
    RandAugOp("Equalize", _equalize, 0.0, 1.0),
    RandAugOp("Identity", _identity, 0.0, 1.0),
    RandAugOp("Posterize", _posterize, 4.0, 8.0),
    RandAugOp("Rotate", _rotate, -30.0, 30.0),
    RandAugOp("Sharpness", _sharpness, 0.05, 0.95),
    RandAugOp("ShearX", _shear_x, -0.3, 0.3),
    RandAugOp("ShearY", _shear_y, -0.3, 0.3),
    RandAugOp("Solarize", _solarize, 0.0, 256.0),
    RandAugOp("TranslateX", _translate_x, -0.3, 0.3),
    RandAugOp("TranslateY", _translate_y, -0.3, 0.3),
)


class RandAugment:
    """``num_ops`` ops drawn with replacement from :data:`RANDAUG_OPS`, each at a uniform magnitude.

    ``fill`` colours the pixels uncovered by Rotate, Shear and Translate (RGB; a 1-channel image uses
    its mean).
    """

    def __init__(self, num_ops: int = 3, fill: tuple[int, ...] = GEOMETRIC_FILL) -> None:
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        self.num_ops = num_ops
        self.fill = tuple(fill)

    def sample(self) -> list[tuple[int, float]]:
        """Draw the ops to apply as ``(index into RANDAUG_OPS, magnitude)`` pairs."""
        if self.num_ops == 0:
            return []
        # Two batched draws rather than 2*num_ops scalar ones: per-call overhead dominates at 32 px.
        indices = torch.randint(len(RANDAUG_OPS), (self.num_ops,)).tolist()
        uniforms = torch.rand(self.num_ops, dtype=torch.float64).tolist()
        plan = []
        for index, u in zip(indices, uniforms, strict=True):
            op = RANDAUG_OPS[index]
            plan.append((index, op.low + (op.high - op.low) * u))
        return plan

    def apply(self, image: Tensor, plan: list[tuple[int, float]]) -> Tensor:
        """Apply a plan from :meth:`sample`."""
        fill = _fill_for(self.fill, image.shape[0])
        for index, magnitude in plan:
            image = RANDAUG_OPS[index].fn(image, magnitude, fill)
        return image

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.sample())

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, fill={self.fill})"


class Cutout:
    """Fill a square of side ``v * width``, ``v ~ U[0, max_fraction)``, at a uniformly random centre.

    The square is clipped to the image, so near a border only part of it shows. TorchSSL instead
    clamps the top-left corner to 0 *before* adding the side, which shifts boxes near the top/left
    border inwards but clips those near the bottom/right; we clip symmetrically, which matches the
    spec's "square of side v·size at a random centre" without the directional bias.
    """

    def __init__(self, max_fraction: float = 0.5, fill: tuple[int, ...] = CUTOUT_FILL) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.fill = tuple(fill)

    def sample(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw a box ``(top, left, bottom, right)`` (exclusive ends, already clipped)."""
        side = int(float(torch.rand(())) * self.max_fraction * width)
        # One draw for both coordinates, reduced modulo each range; the bias at 2**30 is below 1e-8.
        centre = torch.randint(0, 1 << 30, (2,)).tolist()
        cy, cx = centre[0] % height, centre[1] % width
        top, left = cy - side // 2, cx - side // 2
        return max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)

    def __call__(self, image: Tensor) -> Tensor:
        top, left, bottom, right = self.sample(image.shape[-2], image.shape[-1])
        if bottom <= top or right <= left:
            return image
        # The cached fill pixel: building a tensor on every call costs more than the copy below.
        fill = _fill_pixels(_fill_for(self.fill, image.shape[0])).pixel
        image = image.clone()
        image[:, top:bottom, left:right].copy_(fill)
        return image

    def __repr__(self) -> str:
        return f"Cutout(max_fraction={self.max_fraction}, fill={self.fill})"


# ----- views ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewConfig:
    """The view recipe of a DataModule.

    Attributes:
        image_size: side of the square images a view returns.
        crop_pad: pixels of reflect padding before the weak random crop (0: no crop).
        hflip: whether the weak view flips horizontally with probability 0.5.
        randaug_ops: RandAugment ops per strong image.
        cutout: Cutout's maximum side as a fraction of the width (0 disables Cutout).
        mean_fill: Cutout's fill colour (RGB; 1-channel images use its mean).
        affine_degrees: the ``affine`` view's rotation range, ±degrees.
        affine_translate: its shift range per axis, ± this fraction of the side.
        affine_scale: its zoom range ``(min, max)``.
    """

    image_size: int
    crop_pad: int
    hflip: bool
    randaug_ops: int = 3
    cutout: float = 0.5
    mean_fill: tuple[int, ...] = CUTOUT_FILL
    affine_degrees: float = 15.0
    affine_translate: float = 0.1
    affine_scale: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop_pad < 0:
            raise ValueError(f"crop_pad must be >= 0, got {self.crop_pad}")
        if self.randaug_ops < 0:
            raise ValueError(f"randaug_ops must be >= 0, got {self.randaug_ops}")
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"cutout must be in [0, 1], got {self.cutout}")
        if len(self.mean_fill) not in (1, 3):
            raise ValueError(f"mean_fill needs 1 or 3 values, got {self.mean_fill}")
        if not 0.0 <= self.affine_degrees <= 180.0:
            raise ValueError(f"affine_degrees must be in [0, 180], got {self.affine_degrees}")
        if not 0.0 <= self.affine_translate <= 1.0:
            raise ValueError(f"affine_translate must be in [0, 1], got {self.affine_translate}")
        if len(self.affine_scale) != 2 or not 0.0 < self.affine_scale[0] <= self.affine_scale[1]:
            raise ValueError(f"affine_scale must be (min, max) with 0 < min <= max, got {self.affine_scale}")


class IdentityView:
    """The image unchanged."""

    def __call__(self, image: Tensor) -> Tensor:
        return image

    def __repr__(self) -> str:
        return "IdentityView()"


_REFLECT_INDICES: dict[tuple[int, int, bool], Tensor] = {}


def _reflect_indices(length: int, pad: int, flip: bool) -> Tensor:
    """Source index of each position of a line of ``length`` pixels, flipped if ``flip``, then padded by
    ``pad`` on both sides in torch's "reflect" mode (edge pixel not repeated); cached."""
    key = (length, pad, flip)
    indices = _REFLECT_INDICES.get(key)
    if indices is None:
        if pad >= length:
            raise ValueError(f"reflect padding of {pad} px needs images larger than {pad} px, got {length}")
        positions = torch.arange(-pad, length + pad)
        indices = torch.where(positions < 0, -positions, positions)
        indices = torch.where(indices >= length, 2 * (length - 1) - indices, indices)
        if flip:
            # Pixel i of the flipped line is pixel length - 1 - i of the original.
            indices = length - 1 - indices
        _REFLECT_INDICES[key] = indices
    return indices


class WeakView:
    """Random horizontal flip (if ``hflip``), then reflect-pad ``crop_pad`` and random-crop ``image_size``.

    The specs disagree on the order (infomatch: flip then crop; bhattacharyya: crop then flip). Reflect
    padding commutes with a flip and the crop offset is uniform, so both orders give the same
    distribution; we flip first.
    """

    def __init__(self, image_size: int, crop_pad: int, hflip: bool) -> None:
        self.image_size = image_size
        self.crop_pad = crop_pad
        self.hflip = hflip

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        flip = self.hflip and float(torch.rand(())) < 0.5
        pad, size = self.crop_pad, self.image_size
        height, width = image.shape[-2] + 2 * pad, image.shape[-1] + 2 * pad
        if height < size or width < size:
            raise ValueError(
                f"image of {height}x{width} px (after {pad} px padding) is smaller than the {size} px crop"
            )
        top = left = 0
        if height != size or width != size:
            # One draw for both offsets, reduced modulo each range; the bias at 2**30 is below 1e-8.
            offsets = torch.randint(0, 1 << 30, (2,)).tolist()
            top, left = offsets[0] % (height - size + 1), offsets[1] % (width - size + 1)
        if pad == 0:
            image = image.flip(-1) if flip else image
            # Contiguous, like the gather path below: the ops that follow may flatten the image.
            return image[:, top : top + size, left : left + size].contiguous()
        # Flip, pad and crop in one gather of rows then columns: flipping and reflect-padding the whole
        # image only to keep a window of it costs several times more on small images.
        rows = _reflect_indices(image.shape[-2], pad, flip=False)[top : top + size]
        columns = _reflect_indices(image.shape[-1], pad, flip=flip)[left : left + size]
        return image.index_select(-2, rows).index_select(-1, columns)

    def __repr__(self) -> str:
        return f"WeakView(image_size={self.image_size}, crop_pad={self.crop_pad}, hflip={self.hflip})"


class StrongView:
    """``weak``, then RandAugment, then Cutout (when given).

    :meth:`augment` applies only the RandAugment/Cutout part, for a caller that wants the strong image
    built from an already drawn weak image (TorchSSL's "RandAugment on the weak PIL image" taken
    literally: the strong view shares the weak view's flip and crop).
    """

    def __init__(self, weak: WeakView, randaug: RandAugment, cutout: Cutout | None) -> None:
        self.weak = weak
        self.randaug = randaug
        self.cutout = cutout

    def augment(self, weak_image: Tensor) -> Tensor:
        _check_image(weak_image)
        image = self.randaug(weak_image)
        if self.cutout is not None:
            image = self.cutout(image)
        return image

    def __call__(self, image: Tensor) -> Tensor:
        return self.augment(self.weak(image))

    def __repr__(self) -> str:
        return f"StrongView(weak={self.weak!r}, randaug={self.randaug!r}, cutout={self.cutout!r})"


def _resized_crop(size: int) -> list[v2.Transform]:
    return [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()]


class MocoView:
    """``resized_crop`` and, when ``colour`` is set, MoCo v2's colour jitter, grayscale and blur.

    torchvision's transforms draw from the torch global generator, so the DataModule's per-sample
    seeding covers them. Grayscale keeps the channel count.
    """

    def __init__(self, image_size: int, colour: bool) -> None:
        transforms = _resized_crop(image_size)
        if colour:
            kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, about 10% of the side
            transforms += [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            ]
        self.transform = v2.Compose(transforms)
        self.image_size, self.colour = image_size, colour

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        return self.transform(image)

    def __repr__(self) -> str:
        return f"MocoView(image_size={self.image_size}, colour={self.colour})"


def affine_bilinear(image: Tensor, angle: float, translate: tuple[float, float], scale: float) -> Tensor:
    """``image`` rotated by ``angle`` degrees, scaled by ``scale`` about its centre, then shifted by
    ``translate = (dx, dy)`` pixels; bilinear, pixels from outside the image are black.

    The conventions of torchvision's ``F.affine`` (same sign of the angle, same centre) with its
    default ``fill=None``, i.e. ``grid_sample`` with zero padding: ``F.affine`` with ``fill=0`` also
    multiplies by a bilinearly sampled mask, which darkens the border pixels a second time. Uses the
    cached base grid of the RandAugment warp, so one call is a small bmm plus one ``grid_sample``.
    """
    _check_image(image)
    channels, height, width = image.shape
    rot = math.radians(angle)
    cos, sin = math.cos(rot) / scale, math.sin(rot) / scale
    # Output pixel (relative to the centre) -> input pixel: the inverse rotation and zoom of
    # (out - translate); the rows of the result, divided by the half sides, give grid_sample's [-1, 1].
    dx, dy = translate
    rows = [[cos, sin, -(cos * dx + sin * dy)], [-sin, cos, sin * dx - cos * dy]]
    theta = torch.tensor(
        [[v / (0.5 * width) for v in rows[0]], [v / (0.5 * height) for v in rows[1]]], dtype=torch.float32
    )
    grid = _pixel_centres(height, width).bmm(theta.t().unsqueeze(0))
    warped = torch.nn.functional.grid_sample(
        image.to(torch.float32).unsqueeze(0),
        grid.view(1, height, width, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    # A convex combination of values in [0, 255] and black zeros stays in range: no clamp needed.
    return warped.view(channels, height, width).round_().to(torch.uint8)


class AffineView:
    """Random rotation ``U[-degrees, degrees]``, zoom ``U[scale]`` and shift ``U[-translate, translate]``
    times the side per axis, applied by :func:`affine_bilinear` (bilinear, black fill, no flip).

    Shifts are continuous (sub-pixel); torchvision's ``RandomAffine`` rounds them to whole pixels, which
    only matters at nearest-neighbour sampling. Four numbers are drawn per image from the torch global
    generator whatever the ranges, so a zero range does not shift the other draws.
    """

    def __init__(self, degrees: float, translate: float, scale: tuple[float, float]) -> None:
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))

    def sample(self, height: int, width: int) -> tuple[float, tuple[float, float], float]:
        """Draw ``(angle in degrees, (dx, dy) in pixels, scale)``."""
        u = torch.rand(4, dtype=torch.float64).tolist()
        angle = self.degrees * (2.0 * u[0] - 1.0)
        shift = (self.translate * width * (2.0 * u[1] - 1.0), self.translate * height * (2.0 * u[2] - 1.0))
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * u[3]
        return angle, shift, scale

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        angle, shift, scale = self.sample(image.shape[-2], image.shape[-1])
        if angle == 0.0 and shift == (0.0, 0.0) and scale == 1.0:
            return image
        return affine_bilinear(image, angle, shift, scale)

    def __repr__(self) -> str:
        return f"AffineView(degrees={self.degrees}, translate={self.translate}, scale={self.scale})"


def build_view(name: str, config: ViewConfig) -> Callable[[Tensor], Tensor]:
    """The view called ``name`` (one of :data:`VIEW_NAMES`) under ``config``."""
    if name in ("test", "identity"):
        return IdentityView()
    if name == "affine":
        return AffineView(config.affine_degrees, config.affine_translate, config.affine_scale)
    if name in ("resized_crop", "moco_strong"):
        return MocoView(config.image_size, colour=name == "moco_strong")
    weak = WeakView(config.image_size, config.crop_pad, config.hflip)
    if name == "weak":
        return weak
    randaug = RandAugment(config.randaug_ops, GEOMETRIC_FILL)
    if name == "randaug":
        return StrongView(weak, randaug, None)
    if name == "strong":
        cutout = Cutout(config.cutout, config.mean_fill) if config.cutout > 0 else None
        return StrongView(weak, randaug, cutout)
    raise ValueError(f"unknown view {name!r}; valid views: {', '.join(VIEW_NAMES)}")


def view_throughput(view_name: str, config: ViewConfig, n_images: int = 2000, channels: int = 3) -> float:
    """Images per second of one process applying ``view_name`` to random ``uint8`` images.

    Runs with one intra-op thread, as a DataLoader worker does, and under a forked generator so the
    caller's RNG state is left untouched.
    """
    view = build_view(view_name, config)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0,
        256,
        (n_images, channels, config.image_size, config.image_size),
        dtype=torch.uint8,
        generator=generator,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # A few warm-up calls so one-off dispatch/allocation costs do not count.
            for image in images[: min(20, n_images)]:
                view(image)
            start = time.perf_counter()
            for image in images:
                view(image)
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return n_images / elapsed


class DerivedView:
    """``"<view>@<base>"``: the augmentation of ``view`` applied to the output of an earlier ``base`` view.

    ``"strong@weak"`` adds RandAugment and Cutout on top of the same item's ``weak`` image, so the two
    share its crop and flip (InfoMatch's strong views are built this way); a plain ``"strong"`` draws
    its own crop and flip.
    """

    def __init__(self, view: StrongView, base_index: int) -> None:
        self.view = view
        self.base_index = base_index

    def apply(self, previous: list[Tensor]) -> Tensor:
        return self.view.augment(previous[self.base_index])


def build_views(names: list[str], config: ViewConfig) -> list[Callable[[Tensor], Tensor] | DerivedView]:
    """The views of one stream, in order, resolving ``"<view>@<base>"`` against earlier entries."""
    views: list[Callable[[Tensor], Tensor] | DerivedView] = []
    for position, name in enumerate(names):
        if "@" not in name:
            views.append(build_view(name, config))
            continue
        view_name, base_name = name.split("@", 1)
        view = build_view(view_name, config)
        if not isinstance(view, StrongView):
            raise ValueError(f"view {name!r}: only 'strong' and 'randaug' can be applied on top of another view")
        if base_name not in names[:position]:
            raise ValueError(f"view {name!r} needs a {base_name!r} view earlier in the same list, got {names}")
        views.append(DerivedView(view, names.index(base_name)))
    return views
