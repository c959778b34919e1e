"""Checkpoints that are written atomically and checked before a run resumes from them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
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


class RunCheckpoints(Callback):
    """``last.ckpt`` after every validation; ``interrupted.ckpt`` on Ctrl-C, with how to resume.

    Only an interrupt is saved on an exception: after any other one (a NaN loss, say) the weights may
    be the problem, so ``last.ckpt`` from the last validation stays the one to resume from.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._saving_interrupt = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.dirpath / "last.ckpt")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        path = self.dirpath / "interrupted.ckpt"
        self._saving_interrupt = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving_interrupt = False
        if trainer.is_global_zero:
            print(f"\nInterrupted at step {trainer.global_step}; weights saved to {path}.\n"
                  f"Resume with the same command plus --ckpt_path={path}", file=sys.stderr)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._saving_interrupt:
            return
        # The interrupted batch was counted as started but never finished. Lightning rolls back only the
        # per-epoch counters on restart, so the evaluation cadence of a resumed run would shift by one;
        # align every batch counter with the optimiser steps actually taken (one batch per step here).
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        shift = checkpoint["global_step"] - progress["total"]["completed"]
        for counters in (progress["total"], progress["current"]):
            done = counters["completed"] + shift
            counters.update({key: done for key in ("ready", "started", "processed", "completed")})
