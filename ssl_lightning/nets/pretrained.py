"""Reading pretrained weights from local files only.

Nothing here touches the network: a run that asks for pretrained weights and does not find the file
fails, instead of downloading or silently training from a random init.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_IGNORE_KEYS",
    "DEFAULT_STRIP_PREFIXES",
    "PretrainedReport",
    "check_sha256",
    "ignore_keys_matching",
    "read_state_dict",
    "sha256_of_file",
    "strip_key_prefixes",
]

# Wrappers added by DDP, Lightning modules and SSL codebases (SCAN's `backbone.`, USB's `model.`).
DEFAULT_STRIP_PREFIXES: tuple[str, ...] = ("module.", "backbone.", "model.")
# Classifier and self-supervised heads: the class count of the file rarely matches ours, and our
# head is a fresh layer by design.
DEFAULT_IGNORE_KEYS: tuple[str, ...] = (
    r"head\.",
    r"heads\.",
    r"fc\.",
    r"classifier\.",
    r"contrastive_head\.",
    r"cluster_heads?\.",
)
# Checked in this order: the first one holding a mapping is the state dict.
_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_ema")


@dataclass
class PretrainedReport:
    """What `Backbone.load_pretrained` did, for logging next to the run's results."""

    path: str
    sha256: str
    loaded: int
    ignored: list[str] = field(default_factory=list)


class PretrainedWeightsError(FileNotFoundError):
    """A configured pretrained-weights file is missing (weights are never fetched from the network)."""


def _existing_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file not found: {p}. Weights load from a local file only: put the file "
            "there, or point --model.backbone_args at it (its pretrained_path key)."
        )
    return p


def check_pretrained_path(backbone_args: Mapping | None) -> None:
    """Fail early, with the message above, when ``backbone_args`` names a file that does not exist."""
    path = (backbone_args or {}).get("pretrained_path")
    if path is not None:
        _existing_file(path)


def sha256_of_file(path: str | Path) -> str:
    p = _existing_file(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | Path, actual: str, expected: str) -> None:
    if actual.lower() != expected.strip().lower():
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, file has {actual}")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a file and unwrap it to a flat {name: tensor} dict."""
    p = _existing_file(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(p), device="cpu")
    else:
        # weights_only keeps unpickling from running arbitrary code from a downloaded file.
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"{p} holds objects other than tensors and plain containers (e.g. a full training "
                "checkpoint with pickled config objects); re-save just its state dict"
            ) from err
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"{p} holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise RuntimeError(f"{p} contains no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    return state


def strip_key_prefixes(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """Remove any of `prefixes` from the start of each key, repeatedly (`module.backbone.x` → `x`)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if prefix and new.startswith(prefix):
                    new = new[len(prefix) :]
                    changed = True
        if new in out:
            raise RuntimeError(
                f"two keys collapse to {new!r} after stripping prefixes {list(prefixes)}; "
                "the file probably holds several models (e.g. student and EMA): use ignore_keys"
            )
        out[new] = value
    return out


def ignore_keys_matching(
    state: Mapping[str, Tensor], patterns: Sequence[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Split off keys matching any regex in `patterns` (anchored at the start of the key)."""
    compiled = [re.compile(p) for p in patterns]
    kept: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if any(c.match(key) for c in compiled):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped
