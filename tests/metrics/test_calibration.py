"""ReliabilityBins against hand-checked cases and torchmetrics' ECE; the reliability diagram and callback."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from ssl_lightning.callbacks.figures import ReliabilityDiagramFigure, reliability_diagram_figure
from ssl_lightning.metrics.calibration import ReliabilityBins


def two_class_logits(confidences: list[float], correct: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax puts ``confidence`` on class 0; the target is 0 where correct, else 1."""
    p = torch.tensor(confidences, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float()
    target = 1 - torch.tensor(correct, dtype=torch.long)
    return logits, target


def torchmetrics_ece(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    metric = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=n_bins, norm="l1")
    metric.update(logits, target)
    return float(metric.compute())


def edge_row(edge: float, num_classes: int, steps: int = 400) -> torch.Tensor | None:
    """Logits ``[l, 0, ..., 0]`` whose float32 softmax maximum is exactly ``edge``, if float32 has one.

    Starts from the analytic logit and walks it one float32 step at a time towards the edge; None when the
    softmax steps over the edge without landing on it.
    """
    if edge >= 1.0:
        row = torch.zeros(num_classes)
        row[0] = 100.0  # exp(-100) vanishes next to 1 in float32: the maximum is exactly 1.0
        return row
    row = torch.zeros(num_classes)
    row[0] = math.log(edge * (num_classes - 1) / (1 - edge))
    start_below = bool(row.softmax(0)[0] < edge)
    direction = torch.tensor(math.inf if start_below else -math.inf)
    for _ in range(steps):
        top = row.softmax(0)[0]
        if top == edge:
            return row
        if bool(top < edge) != start_below:
            return None
        row[0] = torch.nextafter(row[0], direction)
    return None


def test_golden_ece() -> None:
    # 0.9 lands in bin 13 (accuracy 0.5, gap 0.4), 0.65 in bin 9 (accuracy 1, gap 0.35): 0.5*0.4 + 0.5*0.35.
    logits, target = two_class_logits([0.9, 0.9, 0.65, 0.65], [1, 0, 1, 1])
    metric = ReliabilityBins(n_bins=15)
    metric.update(logits, target)
    result = metric.compute()
    assert float(result["ece"]) == pytest.approx(0.375, abs=1e-6)
    assert torchmetrics_ece(logits, target) == pytest.approx(0.375, abs=1e-6)


def test_hand_checked_bins() -> None:
    # 0.55 and 0.58 share bin 8 = [8/15, 9/15); 0.95 is in bin 14; 1.0 is folded into bin 14 as well.
    logits, target = two_class_logits([0.55, 0.58, 0.95], [1, 0, 1])
    saturated = torch.tensor([[100.0, 0.0]])
    logits = torch.cat([logits, saturated])
    target = torch.cat([target, torch.tensor([1])])  # confidently wrong
    metric = ReliabilityBins(n_bins=15)
    metric.update(logits, target)
    result = metric.compute()

    expected_count = torch.zeros(15, dtype=torch.long)
    expected_count[8], expected_count[14] = 2, 2
    assert torch.equal(result["count"], expected_count)
    expected_confidence = torch.zeros(15)
    expected_confidence[8], expected_confidence[14] = (0.55 + 0.58) / 2, (0.95 + 1.0) / 2
    torch.testing.assert_close(result["confidence"], expected_confidence, atol=1e-6, rtol=0)
    expected_accuracy = torch.zeros(15)
    expected_accuracy[8], expected_accuracy[14] = 0.5, 0.5
    torch.testing.assert_close(result["accuracy"], expected_accuracy, atol=1e-6, rtol=0)
    # torchmetrics keeps confidence 1.0 in a bin of its own: |0.5 - 0.565|*2 + |1 - 0.95| + |0 - 1|, over 4.
    expected_ece = (2 * 0.065 + 0.05 + 1.0) / 4
    assert float(result["ece"]) == pytest.approx(expected_ece, abs=1e-6)
    assert float(result["ece"]) == pytest.approx(torchmetrics_ece(logits, target), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("n_bins", [15, 10])
def test_ece_matches_torchmetrics_on_random_logits(seed: int, n_bins: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_classes = 3 + seed
    logits = torch.randn(500, num_classes, generator=generator) * (0.5 + seed)
    target = torch.randint(num_classes, (500,), generator=generator)
    # A few saturated rows, right and wrong, to cover torchmetrics' separate bin at confidence 1.0.
    logits[:4] = 0.0
    logits[:4, 0] = 100.0
    target[:2] = 0
    metric = ReliabilityBins(n_bins=n_bins)
    metric.update(logits, target)
    result = metric.compute()
    assert int(result["count"].sum()) == 500
    assert float(result["ece"]) == pytest.approx(torchmetrics_ece(logits, target, n_bins), abs=1e-6)


@pytest.mark.parametrize("num_classes", [16, 17, 18])
def test_confidences_on_bin_edges(num_classes: int) -> None:
    edges = torch.linspace(0, 1, 16)
    rows, bins = [], []
    for k in range(1, 16):
        row = edge_row(float(edges[k]), num_classes)
        if row is not None:
            rows.append(row)
            bins.append(min(k, 14))  # an inner edge opens the bin above it; 1.0 is shown in the last bin
    assert len(rows) >= 5, "too few float32 edges reachable to test anything"
    logits = torch.stack(rows)
    assert torch.isin(logits.softmax(dim=1).max(dim=1).values, edges).all()

    for row, expected_bin in zip(rows, bins, strict=True):
        metric = ReliabilityBins(n_bins=15)
        metric.update(row[None], torch.tensor([0]))
        assert int(metric.compute()["count"].argmax()) == expected_bin

    generator = torch.Generator().manual_seed(num_classes)
    target = torch.randint(num_classes, (len(rows),), generator=generator)
    noise = torch.randn(200, num_classes, generator=generator) * 2
    logits = torch.cat([logits, noise])
    target = torch.cat([target, torch.randint(num_classes, (200,), generator=generator)])
    metric = ReliabilityBins(n_bins=15)
    metric.update(logits, target)
    assert float(metric.compute()["ece"]) == pytest.approx(torchmetrics_ece(logits, target), abs=1e-6)


def test_two_updates_equal_one_update_on_concatenation() -> None:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 5, generator=generator) * 3
    target = torch.randint(5, (300,), generator=generator)
    split = ReliabilityBins()
    split.update(logits[:120], target[:120])
    split.update(logits[120:], target[120:])
    whole = ReliabilityBins()
    whole.update(logits, target)
    split_result, whole_result = split.compute(), whole.compute()
    assert torch.equal(split_result["count"], whole_result["count"])
    for key in ("confidence", "accuracy", "ece"):
        torch.testing.assert_close(split_result[key], whole_result[key], atol=1e-6, rtol=0)


def test_empty_metric_computes_zeros() -> None:
    result = ReliabilityBins(n_bins=4).compute()
    assert result["count"].tolist() == [0, 0, 0, 0]
    assert result["confidence"].tolist() == [0.0] * 4
    assert result["accuracy"].tolist() == [0.0] * 4
    assert float(result["ece"]) == 0.0


def test_figure_title_reports_ece() -> None:
    import matplotlib.pyplot as plt

    logits, target = two_class_logits([0.9, 0.9, 0.65, 0.65], [1, 0, 1, 1])
    metric = ReliabilityBins()
    metric.update(logits, target)
    figure = reliability_diagram_figure(metric.compute())
    try:
        title = figure.axes[0].get_title()
        assert title.startswith("test reliability diagram (EMA weights)")
        assert "ECE = 0.3750" in title
        assert len(figure.axes) == 2  # the diagram and the occupancy histogram
    finally:
        plt.close(figure)


class _FakeWandbLogger:
    """Named like Lightning's WandbLogger, which is all the callback checks, with a recording experiment."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.experiment = types.SimpleNamespace(log=self.logged.append)


_FakeWandbLogger.__name__ = "WandbLogger"


def test_callback_writes_png_and_logs_to_wandb(tmp_path: Path) -> None:
    logits, target = two_class_logits([0.9, 0.9, 0.65, 0.65], [1, 0, 1, 1])
    metric = ReliabilityBins()
    metric.update(logits, target)
    logger = _FakeWandbLogger()
    trainer = types.SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path / "run"), loggers=[logger]
    )
    module = types.SimpleNamespace(reliability=metric.compute())
    ReliabilityDiagramFigure().on_test_end(trainer, module)
    path = tmp_path / "run" / "reliability_diagram.png"
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(logger.logged) == 1 and "test/reliability_diagram" in logger.logged[0]


def test_callback_does_nothing_without_bins_or_off_global_zero(tmp_path: Path) -> None:
    trainer = types.SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    ReliabilityDiagramFigure().on_test_end(trainer, types.SimpleNamespace(reliability=None))
    ReliabilityDiagramFigure().on_test_end(trainer, types.SimpleNamespace())

    metric = ReliabilityBins()
    metric.update(torch.randn(10, 3), torch.randint(3, (10,)))
    other_rank = types.SimpleNamespace(is_global_zero=False, default_root_dir=str(tmp_path), loggers=[])
    ReliabilityDiagramFigure().on_test_end(other_rank, types.SimpleNamespace(reliability=metric.compute()))
    assert list(tmp_path.iterdir()) == []
