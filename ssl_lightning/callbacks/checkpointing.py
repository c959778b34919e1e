"""Checkpoints that are written atomically and checked before a run resumes from them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint given to resume from cannot be used."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename it into place.

    A run killed while saving leaves the previous ``last.ckpt`` intact instead of a truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def check_checkpoint(path: str | Path) -> None:
    """Fail with a clear message if ``path`` is missing, unreadable or not a Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file to --ckpt_path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (any unpickling failure means the same thing here)
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(error).__name__}: {error}). The file is truncated "
            "or not a PyTorch checkpoint. Nothing was changed; resume from another checkpoint (for "
            "example an earlier run's checkpoints/last.ckpt)."
        ) from None
    missing = [key for key in ("state_dict", "global_step", "optimizer_states") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint (missing {', '.join(missing)}); "
            "only checkpoints written by a training run can be resumed."
        )
