"""Training throughput in images per second (all views of all streams, all ranks)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


def writes_logs_now(trainer: Trainer | None) -> bool:
    """Whether per-step values logged now reach the loggers (every ``log_every_n_steps``), as Lightning decides.

    Lightning 2.6 spends ~1-2 ms of bookkeeping on every ``self.log`` call, written or not: per-step training
    values are logged only when this is true, which changes nothing that is written.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs)


class TrainThroughput(Callback):
    """Measures the wall time between consecutive training batches.

    Intervals that contain a validation run and the first ``warmup`` steps (compilation, worker start)
    are left out, so the average describes steady-state training.
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self._last_start: float | None = None
        self._last_images = 0
        self._steps = 0
        self.total_images = 0
        self.total_seconds = 0.0

    @staticmethod
    def _images_in(batch: Any) -> int:
        if isinstance(batch, dict):
            return sum(view.shape[0] for stream in batch.values() for view in stream.views)
        return 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_start is not None:
            self._steps += 1
            elapsed = now - self._last_start
            if self._steps > self.warmup and elapsed > 0:
                self.total_images += self._last_images
                self.total_seconds += elapsed
                if writes_logs_now(trainer):
                    pl_module.log("train/images_per_s", self._last_images / elapsed, batch_size=1)
        self._last_start = now
        self._last_images = self._images_in(batch) * trainer.world_size

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_start = None

    def average(self) -> float | None:
        return round(self.total_images / self.total_seconds, 1) if self.total_seconds > 0 else None
