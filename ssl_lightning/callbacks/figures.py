"""Figures written next to the results: the test confusion matrix, the test reliability diagram and, for
localisation models, the infoCAM overlays.

They are built as ``matplotlib.figure.Figure`` objects, without pyplot: no backend is switched and no global
figure state is touched, so training inside a notebook leaves its inline plots working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def confusion_matrix_figure(matrix: torch.Tensor, title: str = "test confusion matrix (EMA weights)"):  # noqa: ANN201
    from matplotlib.figure import Figure

    counts = matrix.float()
    row_normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(12.0, 2.0 + 0.4 * counts.shape[0])
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
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


def _wanted(trainer: Trainer) -> bool:
    """Figures come from rank 0 after a real test pass; a ``fast_dev_run`` smoke test draws none."""
    return trainer.is_global_zero and not getattr(trainer, "fast_dev_run", False)


def _save_and_log(trainer: Trainer, figure: Any, name: str) -> None:
    """Write ``<name>.png`` into the run directory and log it to W&B as ``test/<name>`` if active."""
    path = Path(trainer.default_root_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({f"test/{name}": wandb.Image(figure)})


class ConfusionMatrixFigure(Callback):
    """Saves ``confusion_matrix.png`` in the run directory after testing, and logs it to W&B if active."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        matrix = getattr(pl_module, "confusion_matrix", None)
        if matrix is None or not _wanted(trainer):
            return
        _save_and_log(trainer, confusion_matrix_figure(matrix), "confusion_matrix")


def reliability_diagram_figure(  # noqa: ANN201
    bins: dict[str, torch.Tensor], title: str = "test reliability diagram (EMA weights)"
):
    """Accuracy per confidence bin against the diagonal, with the calibration gap and the bin occupancy.

    ``bins`` is what ``ReliabilityBins.compute()`` returns.
    """
    from matplotlib.figure import Figure

    count = bins["count"].detach().cpu().double()
    confidence = bins["confidence"].detach().cpu().double()
    accuracy = bins["accuracy"].detach().cpu().double()
    ece = float(bins["ece"])
    n_bins = count.numel()
    width = 1.0 / n_bins
    centres = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * width
    occupied = count > 0

    figure = Figure(figsize=(5.5, 6.5))
    axis, histogram = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    axis.bar(centres[occupied].numpy(), accuracy[occupied].numpy(), width=width, color="tab:blue",
             edgecolor="black", linewidth=0.5, label="accuracy")
    # The gap is drawn between accuracy and mean confidence, so over- and under-confidence both show as the
    # hatched part, above or below the top of the accuracy bar.
    low = torch.minimum(accuracy, confidence)[occupied]
    axis.bar(centres[occupied].numpy(), (confidence - accuracy).abs()[occupied].numpy(), bottom=low.numpy(),
             width=width, facecolor=(1.0, 0.0, 0.0, 0.15), edgecolor="tab:red", hatch="//", linewidth=0.5,
             label="gap to confidence")
    axis.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", linewidth=1.0,
              label="perfect calibration")
    axis.set_xlim(0.0, 1.0)
    axis.set_ylim(0.0, 1.0)
    axis.set_ylabel("accuracy")
    axis.set_title(f"{title}\nECE = {ece:.4f}")
    axis.legend(loc="upper left", fontsize=8)

    histogram.bar(centres.numpy(), count.numpy(), width=width, color="gray", edgecolor="black", linewidth=0.5)
    histogram.set_xlabel("confidence")
    histogram.set_ylabel("count")
    figure.tight_layout()
    return figure


class ReliabilityDiagramFigure(Callback):
    """Saves ``reliability_diagram.png`` in the run directory after testing, and logs it to W&B if active."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bins = getattr(pl_module, "reliability", None)
        if bins is None or not _wanted(trainer):
            return
        _save_and_log(trainer, reliability_diagram_figure(bins), "reliability_diagram")


def cam_overlay_figure(overlays: dict[str, torch.Tensor], columns: int = 8):  # noqa: ANN201
    """A grid of test images with the infoCAM map on top, the GT box (green) and the predicted box (red)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    images, maps = overlays["images"], overlays["maps"]
    n = images.shape[0]
    rows = max(1, -(-n // columns))
    figure = Figure(figsize=(1.6 * columns, 1.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= n:
            continue
        image = images[index]
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        axis.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
        axis.imshow(maps[index].numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        boxes = [(overlays["gt_boxes"][index], "lime")]
        if bool(overlays["has_box"][index]):
            boxes.append((overlays["pred_boxes"][index], "red"))
        for (x1, y1, x2, y2), colour in ((b.tolist(), c) for b, c in boxes):
            axis.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.2))
    figure.suptitle(f"infoCAM (mean_others) on test, box threshold {float(overlays['threshold']):.2f}")
    figure.tight_layout()
    return figure


class CAMOverlayFigure(Callback):
    """Saves ``cam_overlays.png`` after testing a localisation model, and logs it to W&B if active."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        overlays = getattr(pl_module, "overlays", None)
        if overlays is not None and _wanted(trainer):
            _save_and_log(trainer, cam_overlay_figure(overlays), "cam_overlays")
