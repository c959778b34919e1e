"""Reading run directories (``runs/<experiment>/<timestamp>-<seed>/``): ``results.json`` and the CSV log.

Notebooks and ``make report`` read runs through these functions only, so the run-directory contract
(DESIGN.md §2) has one reader.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Curve:
    """Every logged value of one metric, in the order it was logged."""

    steps: np.ndarray
    values: np.ndarray


def find_results(root: str | Path) -> list[Path]:
    """Every ``results.json`` under ``root``, sorted by path (so by experiment, then start time)."""
    return sorted(Path(root).rglob("results.json"))


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def run_dirs(root: str | Path, experiment: str) -> list[Path]:
    """The finished runs (those with a ``results.json``) of one experiment, oldest first."""
    return [path.parent for path in sorted((Path(root) / experiment).glob("*/results.json"))]


def latest_run(root: str | Path, experiment: str) -> Path:
    runs = run_dirs(root, experiment)
    if not runs:
        raise FileNotFoundError(
            f"no finished run of '{experiment}' under {root}: train one with `make train EXP={experiment}`"
        )
    return runs[-1]


def read_metrics(run_dir: str | Path) -> dict[str, Curve]:
    """Every metric of a run's CSV log (``logs/metrics.csv``) as a :class:`Curve`, keyed by its logged name
    (``train/loss``, ``test/acc``, ...). Lightning writes one row per logging call, so each metric keeps
    only the rows where it has a value."""
    log = Path(run_dir) / "logs" / "metrics.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist: is {run_dir} a run directory written by the CLI?")
    steps: dict[str, list[float]] = {}
    values: dict[str, list[float]] = {}
    with log.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                steps.setdefault(key, []).append(step)
                values.setdefault(key, []).append(float(value))
    return {key: Curve(np.asarray(steps[key]), np.asarray(values[key])) for key in values}
