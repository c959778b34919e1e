"""Name → constructor registry for backbones, filled by the `register_backbone` decorator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ssl_lightning.nets.base import Backbone

__all__ = ["available_backbones", "build_backbone", "register_backbone"]

BackboneFn = Callable[..., Backbone]
F = TypeVar("F", bound=BackboneFn)

_REGISTRY: dict[str, BackboneFn] = {}


def register_backbone(name: str) -> Callable[[F], F]:
    """Register a constructor `fn(num_classes, in_channels, image_size, **kwargs) -> Backbone`."""

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    *,
    pretrained_path: str | None = None,
    pretrained_sha256: str | None = None,
    strip_prefixes: Sequence[str] | None = None,
    ignore_keys: Sequence[str] | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a registered backbone, then optionally load trunk weights from a local file.

    Args:
        name: one of `available_backbones()`.
        num_classes: size of the head; 0 for no head (forward returns the features).
        in_channels: 1 or 3 for image backbones (1-channel inputs are repeated where the stem is
            fixed at 3 channels).
        image_size: input side in pixels; some backbones derive their layout from it.
        pretrained_path: local weights file for the trunk (the head is never loaded).
        pretrained_sha256: if given, the file's sha256 must match.
        strip_prefixes: key prefixes removed from the file (default `module.`, `backbone.`, `model.`).
        ignore_keys: regexes of file keys to drop (default: head/fc/classifier-like keys).
        **kwargs: backbone-specific options; an unknown one raises TypeError.

    Raises:
        ValueError: unknown name.
    """
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; available: {', '.join(available_backbones())}"
        ) from None
    if pretrained_path is None and pretrained_sha256 is not None:
        raise ValueError("pretrained_sha256 was given without pretrained_path")
    model = fn(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if pretrained_path is not None:
        model.load_pretrained(
            pretrained_path,
            sha256=pretrained_sha256,
            strip_prefixes=strip_prefixes,
            ignore_keys=ignore_keys,
        )
    return model
