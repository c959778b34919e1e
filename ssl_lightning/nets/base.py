"""The `Backbone` interface shared by every network in the package.

A backbone maps a batch of inputs to pooled features of size `num_features` and owns a linear
`head` on top of them. Methods call `forward_with_features` when they need both, so the trunk runs
once per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_lightning.nets.pretrained import (
    DEFAULT_IGNORE_KEYS,
    DEFAULT_STRIP_PREFIXES,
    PretrainedReport,
    check_sha256,
    ignore_keys_matching,
    read_state_dict,
    sha256_of_file,
    strip_key_prefixes,
)

log = logging.getLogger(__name__)

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Base class: a feature extractor plus a linear head.

    Subclasses implement `features` and call `_init_head` once they know their feature size.

    Attributes:
        num_features: size of the pooled feature vector returned by `features`.
        num_classes: number of logits; 0 means no head and `forward` returns the features.
        head: `nn.Linear(num_features, num_classes)`, or `nn.Identity()` when `num_classes == 0`.
    """

    num_features: int
    num_classes: int
    head: nn.Module

    # Name of the attribute holding a wrapped third-party model (timm, torchvision), if any. Its
    # parameter names are those of the upstream model, so pretrained files map onto it key for key.
    _trunk_attr: str | None = None
    # Channels of the stem when it is fixed (e.g. 3 for models with 3-channel pretrained weights);
    # 1-channel inputs are then repeated. None means the stem was built with the requested channels.
    _fixed_in_channels: int | None = None

    def _init_head(self, num_features: int, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        """Pooled pre-head features, shape (N, num_features)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes); the features themselves when `num_classes == 0`."""
        return self.head(self.features(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features) from a single pass through the trunk."""
        feats = self.features(x)
        return self.head(feats), feats

    def _match_channels(self, x: Tensor) -> Tensor:
        """Repeat a grey input to the fixed stem width (a no-op for stems built to measure)."""
        want = self._fixed_in_channels
        if want is not None and x.dim() == 4 and x.shape[1] == 1 and want != 1:
            # expand (not repeat) avoids a copy; the stem conv reads the broadcast view directly.
            return x.expand(-1, want, -1, -1)
        return x

    # ------------------------------------------------------------------ pretrained weights

    def _pretrained_target(self) -> nn.Module:
        """The module whose state dict a pretrained file is matched against."""
        return getattr(self, self._trunk_attr) if self._trunk_attr else self

    def _adapt_pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook for model-specific fixes (key renames, position-embedding resampling)."""
        return state

    def load_pretrained(
        self,
        path: str,
        sha256: str | None = None,
        strip_prefixes: Sequence[str] | None = None,
        ignore_keys: Sequence[str] | None = None,
    ) -> PretrainedReport:
        """Load trunk weights from a local file; the head is never loaded.

        The file may be a raw state dict or a dict wrapping one under `state_dict`, `model` or
        `model_ema` (.pth/.pt/.ckpt via `torch.load(weights_only=True)`, or .safetensors). Prefixes
        such as `module.`/`backbone.` are stripped, head-like keys are dropped, then every remaining
        trunk parameter must be present with the right shape and no key may be left over: a wrong
        file must fail here rather than silently train from scratch.

        Raises:
            FileNotFoundError: the file does not exist (no download is ever attempted).
            ValueError: the sha256 does not match.
            RuntimeError: missing, unexpected or mis-shaped keys (all listed in the message).
        """
        digest = sha256_of_file(path)
        if sha256 is not None:
            check_sha256(path, digest, sha256)
        raw = read_state_dict(path)
        prefixes = list(DEFAULT_STRIP_PREFIXES if strip_prefixes is None else strip_prefixes)
        if self._trunk_attr:
            # A file saved from this very class carries the wrapper's attribute name as a prefix.
            prefixes.append(f"{self._trunk_attr}.")
        state = strip_key_prefixes(raw, prefixes)
        state, ignored = ignore_keys_matching(
            state, DEFAULT_IGNORE_KEYS if ignore_keys is None else ignore_keys
        )
        state = self._adapt_pretrained_state(state)

        target = self._pretrained_target()
        expected = {k: v for k, v in target.state_dict().items() if not k.startswith("head.")}
        missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in expected)
        mismatched = sorted(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        )
        if missing or unexpected or mismatched:
            raise RuntimeError(
                f"pretrained file {path} does not match {type(self).__name__}:\n"
                + _key_listing("missing", missing)
                + _key_listing("unexpected", unexpected)
                + _key_listing("shape mismatch", mismatched)
                + "(prefixes stripped: "
                + ", ".join(prefixes)
                + "; pass strip_prefixes / ignore_keys to adjust)"
            )
        to_load = {k: v for k, v in state.items() if k in expected}
        with torch.no_grad():
            target.load_state_dict(to_load, strict=False)
        report = PretrainedReport(path=str(path), sha256=digest, loaded=len(to_load), ignored=sorted(ignored))
        log.info(
            "loaded %d tensors from %s (sha256 %s); ignored %d keys",
            report.loaded,
            path,
            digest,
            len(report.ignored),
        )
        return report

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_classes={self.num_classes}"


def _key_listing(label: str, keys: Sequence[str], limit: int = 20) -> str:
    if not keys:
        return ""
    shown = list(keys)[:limit]
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {label} ({len(keys)}): " + ", ".join(shown) + more + "\n"
