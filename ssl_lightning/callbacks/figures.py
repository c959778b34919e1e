"""Figures written next to the results: the test confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def confusion_matrix_figure(matrix: torch.Tensor, title: str = "test confusion matrix (EMA weights)"):  # noqa: ANN201
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.float()
    row_normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(12.0, 2.0 + 0.4 * counts.shape[0])
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(row_normalised.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    if counts.shape[0] <= 20:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                axis.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if row_normalised[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


class ConfusionMatrixFigure(Callback):
    """Saves ``confusion_matrix.png`` in the run directory after testing, and logs it to W&B if active."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        matrix = getattr(pl_module, "confusion_matrix", None)
        if matrix is None or not trainer.is_global_zero:
            return
        import matplotlib.pyplot as plt

        figure = confusion_matrix_figure(matrix)
        path = Path(trainer.default_root_dir) / "confusion_matrix.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({"test/confusion_matrix": wandb.Image(figure)})
        plt.close(figure)
