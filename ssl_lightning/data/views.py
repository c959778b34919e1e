"""Augmentation views on ``uint8`` image tensors of shape ``(C, H, W)``, ``C`` in ``{1, 3}``.

A *view* is a picklable callable ``Tensor -> Tensor`` built by name from a :class:`ViewConfig`:

- ``test`` / ``identity``: the image unchanged (evaluation images are already at the model's size).
- ``weak``: random horizontal flip (when enabled), then reflect padding and a random crop back to
  ``image_size``.
- ``randaug``: ``weak``, then :class:`RandAugment`.
- ``strong``: ``weak``, then :class:`RandAugment`, then :class:`Cutout`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

#: Cutout's grey, as TorchSSL/USB draw it (roughly the CIFAR-10 pixel mean).
CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
#: Fill of the pixels that Rotate/Shear/Translate uncover. TorchSSL calls PIL's ``rotate`` and
#: ``transform`` without ``fillcolor``, so those pixels are black; we keep that (the spec calls this
#: "the TorchSSL RandAugment" and is silent on the geometric fill).
GEOMETRIC_FILL: tuple[int, int, int] = (0, 0, 0)

VIEW_NAMES: tuple[str, ...] = ("test", "identity", "weak", "randaug", "strong")


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
# a magnitude ignore it.


def _auto_contrast(image: Tensor, _: float, __: list[float]) -> Tensor:
    return F.autocontrast(image)


def _brightness(image: Tensor, factor: float, _: list[float]) -> Tensor:
    return F.adjust_brightness(image, factor)


def _color(image: Tensor, factor: float, _: list[float]) -> Tensor:
    # torchvision returns a 1-channel image unchanged here, as PIL's Color enhance does for "L" images.
    return F.adjust_saturation(image, factor)


def _contrast(image: Tensor, factor: float, _: list[float]) -> Tensor:
    return F.adjust_contrast(image, factor)


def _equalize(image: Tensor, _: float, __: list[float]) -> Tensor:
    return F.equalize(image)


def _identity(image: Tensor, _: float, __: list[float]) -> Tensor:
    return image


def _posterize(image: Tensor, bits: float, _: list[float]) -> Tensor:
    # TorchSSL truncates the uniform draw, so bits is 4..7 (8, a no-op, has probability zero).
    return F.posterize(image, max(1, int(bits)))


def _rotate(image: Tensor, degrees: float, fill: list[float]) -> Tensor:
    # Counter-clockwise about the centre with nearest sampling, as PIL's Image.rotate.
    return F.rotate(image, degrees, interpolation=InterpolationMode.NEAREST, fill=fill)


def _sharpness(image: Tensor, factor: float, _: list[float]) -> Tensor:
    return F.adjust_sharpness(image, factor)


def _shear(image: Tensor, shear_x: float, shear_y: float, fill: list[float]) -> Tensor:
    # PIL's affine (1, v, 0, 0, 1, 0) shears about the top-left corner, not the centre, so the sheared
    # image also drifts sideways by up to v*H; centre=[0, 0] and angle atan(v) reproduce that exactly.
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


def _shear_x(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _shear(image, v, 0.0, fill)


def _shear_y(image: Tensor, v: float, fill: list[float]) -> Tensor:
    return _shear(image, 0.0, v, fill)


def _solarize(image: Tensor, threshold: float, _: list[float]) -> Tensor:
    # PIL inverts pixels >= threshold; a threshold above 255 (the range reaches 256) inverts nothing,
    # and torchvision rejects thresholds above the dtype's maximum, so that case is handled here.
    if threshold > 255:
        return image
    return F.solarize(image, threshold)


def _translate(image: Tensor, dx: float, dy: float, fill: list[float]) -> Tensor:
    # PIL's affine (1, 0, v, 0, 1, 0) samples input x + v, i.e. moves the content by -v; the range is
    # symmetric so the sign only matters for matching the reference op for op.
    return F.affine(
        image,
        angle=0.0,
        translate=[-dx, -dy],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
        fill=fill,
    )


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
        fill = torch.tensor(_fill_for(self.fill, image.shape[0]), dtype=image.dtype).view(-1, 1, 1)
        image = image.clone()
        image[:, top:bottom, left:right] = fill
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
    """

    image_size: int
    crop_pad: int
    hflip: bool
    randaug_ops: int = 3
    cutout: float = 0.5
    mean_fill: tuple[int, ...] = CUTOUT_FILL

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


class IdentityView:
    """The image unchanged."""

    def __call__(self, image: Tensor) -> Tensor:
        return image

    def __repr__(self) -> str:
        return "IdentityView()"


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
        if self.hflip and float(torch.rand(())) < 0.5:
            image = F.horizontal_flip(image)
        if self.crop_pad > 0:
            image = F.pad(image, [self.crop_pad], padding_mode="reflect")
        height, width = image.shape[-2:]
        size = self.image_size
        if height < size or width < size:
            raise ValueError(
                f"image of {height}x{width} px (after {self.crop_pad} px padding) is smaller than the "
                f"{size} px crop"
            )
        if height == size and width == size:
            return image
        # One draw for both offsets, reduced modulo each range; the bias at 2**30 is below 1e-8.
        offsets = torch.randint(0, 1 << 30, (2,)).tolist()
        top, left = offsets[0] % (height - size + 1), offsets[1] % (width - size + 1)
        return image[:, top : top + size, left : left + size]

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


def build_view(name: str, config: ViewConfig) -> Callable[[Tensor], Tensor]:
    """The view called ``name`` (one of :data:`VIEW_NAMES`) under ``config``."""
    if name in ("test", "identity"):
        return IdentityView()
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
