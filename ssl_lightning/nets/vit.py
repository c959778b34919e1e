"""timm Vision Transformers, built directly (never through the hub), with local-file weights.

Token (CLS) pooling, qkv bias and LayerNorm eps 1e-6, as in USB's ViTs, whose released files use
timm's parameter names and therefore load key for key (the head excepted).
"""

from __future__ import annotations

import math
from functools import partial

from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.registry import register_backbone

__all__ = ["TimmViT", "default_patch_size"]

# (embed_dim, depth, num_heads)
_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def default_patch_size(image_size: int) -> int:
    """Patch 2 up to 32 px (ViT-S/2 @ 32: 256 patches), else 16 (ViT-B/16 @ 96: 36 patches)."""
    return 2 if image_size <= 32 else 16


class TimmViT(Backbone):
    """A timm `VisionTransformer` without its classifier; features are the pre-logits CLS token.

    The patch embedding stays at 3 input channels so RGB pretrained files load; grey inputs are
    repeated. The wrapped model lives in `encoder`, with timm's parameter names.
    """

    _trunk_attr = "encoder"
    _fixed_in_channels = 3

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        in_channels: int = 3,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"ViT backbones take 1- or 3-channel inputs, got {in_channels}")
        patch = default_patch_size(image_size) if patch_size is None else patch_size
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch}")
        self.patch_size = patch
        self.encoder = VisionTransformer(
            img_size=image_size,
            patch_size=patch,
            in_chans=3,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path_rate,
        )
        self._init_head(embed_dim, num_classes)
        if isinstance(self.head, nn.Linear):
            # timm's own head init; small logits keep the first fine-tuning steps gentle.
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor) -> Tensor:
        tokens = self.encoder.forward_features(self._match_channels(x))
        return self.encoder.forward_head(tokens, pre_logits=True)

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        enc = self.encoder
        kernel_key = "patch_embed.proj.weight"
        if kernel_key in state:
            have, want = tuple(state[kernel_key].shape), tuple(enc.patch_embed.proj.weight.shape)
            if have != want:
                # Resampling patch kernels changes what the weights mean; refuse instead of guessing.
                raise RuntimeError(
                    f"patch embedding kernel in the file is {have}, the model needs {want} "
                    f"(patch_size={self.patch_size}); choose the matching patch_size"
                )
        pos = state.get("pos_embed")
        if pos is not None and tuple(pos.shape) != tuple(enc.pos_embed.shape):
            if pos.shape[-1] != enc.pos_embed.shape[-1]:
                return state  # a width mismatch: reported by the generic shape check
            num_prefix = 0 if enc.no_embed_class else enc.num_prefix_tokens
            old_tokens = pos.shape[1] - num_prefix
            side = math.isqrt(old_tokens)
            if side * side != old_tokens:
                raise RuntimeError(f"pos_embed in the file has {old_tokens} patch tokens, not a square grid")
            state = dict(state)
            state["pos_embed"] = resample_abs_pos_embed(
                pos,
                new_size=list(enc.patch_embed.grid_size),
                old_size=[side, side],
                num_prefix_tokens=num_prefix,
            )
        return state


def _make_vit(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    patch_size: int | None,
    drop_path_rate: float,
    embed_dim: int | None,
    depth: int | None,
    num_heads: int | None,
) -> TimmViT:
    d, n, h = _SIZES[name]
    return TimmViT(
        num_classes=num_classes,
        image_size=image_size,
        embed_dim=d if embed_dim is None else embed_dim,
        depth=n if depth is None else depth,
        num_heads=h if num_heads is None else num_heads,
        in_channels=in_channels,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
    )


@register_backbone("vit_tiny")
def vit_tiny(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> TimmViT:
    """ViT-Tiny (192, 12 blocks, 3 heads); the size overrides serve tiny CPU configs."""
    sizes = (embed_dim, depth, num_heads)
    return _make_vit("vit_tiny", num_classes, in_channels, image_size, patch_size, drop_path_rate, *sizes)


@register_backbone("vit_small")
def vit_small(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> TimmViT:
    """ViT-Small (384, 12 blocks, 6 heads): ViT-S/2 @ 32 with the default patch size."""
    sizes = (embed_dim, depth, num_heads)
    return _make_vit("vit_small", num_classes, in_channels, image_size, patch_size, drop_path_rate, *sizes)


@register_backbone("vit_base")
def vit_base(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> TimmViT:
    """ViT-Base (768, 12 blocks, 12 heads): ViT-B/16 @ 96 with the default patch size."""
    sizes = (embed_dim, depth, num_heads)
    return _make_vit("vit_base", num_classes, in_channels, image_size, patch_size, drop_path_rate, *sizes)
