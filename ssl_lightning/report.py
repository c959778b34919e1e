"""``make report``: every finished run beside the specs' reference numbers, as Markdown, CSV and a plot.

``python -m ssl_lightning.report [--runs DIR] [--out DIR] [--references FILE]`` reads every ``results.json``
under ``--runs`` (default ``runs/``; files under ``--out`` are skipped, so a report never reads itself) through
:mod:`ssl_lightning.runs`, groups the runs by experiment and variant (the sorted command-line overrides that
change what is trained), and writes to ``--out`` (default ``runs/report/``):

- ``report.csv``: long format, one row per (experiment, variant, weights, metric, reference entry): our
  mean and sample std over seeds for ``test`` (the last checkpoint, EMA weights where the method keeps them),
  ``test_raw``, and, where the runs monitored the test set during training, ``best_test_selected_optimistic``
  and ``mean_last_20``; the reference columns come from ``experiments/references/numbers.yaml``. A reference that no
  run matches still gets a row (``n_seeds`` 0), so the CSV also lists what remains to reproduce.
- ``report.md``: one table per method with the headline metric and every metric that has a reference.
- ``report.png``: our mean ± std beside each reference.

Our headline number is always the **last** checkpoint; a best-over-training number is selected on the test set,
so it is only shown labelled as such. A group whose runs stopped before the experiment's ``trainer.max_steps``
is flagged "short schedule": it is a smoke run, never a reproduction of the reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ssl_lightning.runs import REPO_ROOT, find_results, load_results

DEFAULT_RUNS = REPO_ROOT / "runs"
DEFAULT_OUT = REPO_ROOT / "runs" / "report"
DEFAULT_REFERENCES = REPO_ROOT / "experiments" / "references" / "numbers.yaml"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

SELECTIONS = ("best", "last", "mean_last_20", "unspecified")
REFERENCE_KEYS = ("metric", "value", "std", "selection", "source")
# ``test``: the CLI's headline weights (EMA where the method keeps one); ``test_raw``: the raw weights; the last
# two summarise the test-set monitoring during training (the best is selected on test: optimistic).
WEIGHTS = ("test", "test_raw", "best_test_selected_optimistic", "mean_last_20")
AS_CONFIGURED = "as configured"
# Metrics that are not fractions in [0, 1] (shown as they are, not in %): losses, counts, thresholds, MI in nats.
NON_FRACTION_METRICS = frozenset({"nll", "count", "loc_count", "val_tau", "best_threshold"})
CSV_COLUMNS = (
    "experiment", "variant", "method", "dataset", "num_labels", "n_seeds", "seeds", "steps", "short_schedule",
    "weights", "metric", "mean", "std", "reference", "reference_std", "reference_selection", "reference_source",
    "notes",
)
NO_RUNS_MESSAGE = "No runs found under {runs}: train one with `make train EXP=<experiment>` (see `make experiments`)."
_BEST_KEY = re.compile(r"^best_(.+)_test_selected_optimistic$")
_MEAN_LAST_KEY = re.compile(r"^mean_last_20_(.+)$")


# ----- references ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """One published (or spec-quoted) number for one metric of one experiment, in our units."""

    experiment: str
    metric: str
    value: float
    std: float | None
    selection: str
    source: str


def load_references(path: str | Path) -> dict[str, list[Reference]]:
    """``references/numbers.yaml`` as experiment → entries, checked against its schema, so a typo fails loudly here
    instead of silently never joining. A missing file means no references (the report still lists runs)."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping experiment -> list of entries")
    return {str(experiment): [_reference(str(experiment), entry, path) for entry in _entries(experiment, entries, path)]
            for experiment, entries in raw.items()}


def _entries(experiment: Any, entries: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: {experiment}: expected a list of mappings")
    return entries


def _reference(experiment: str, entry: dict[str, Any], path: Path) -> Reference:
    """One entry, validated: exactly the schema's keys, a numeric value, a known selection, a source."""
    where = f"{path}: {experiment}: {entry}"
    unknown = set(entry) - set(REFERENCE_KEYS)
    missing = {"metric", "value", "selection", "source"} - set(entry)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    metric, selection, source = entry["metric"], entry["selection"], entry["source"]
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"{where}: metric must be a non-empty string")
    if selection not in SELECTIONS:
        raise ValueError(f"{where}: selection must be one of {SELECTIONS}")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{where}: source must be a non-empty string")
    std = entry.get("std")
    for name, value in (("value", entry["value"]), ("std", std)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {name} must be a number")
    return Reference(experiment, metric, float(entry["value"]), None if std is None else float(std), selection,
                     source)


# ----- runs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """The fields of one ``results.json`` that the report uses (the layout of cli.py ``_write_results``)."""

    path: Path
    experiment: str
    method: str
    dataset: str
    num_labels: int | None
    seed: int | None
    variant: str
    global_step: int | None
    test: dict[str, float]
    test_raw: dict[str, float]
    test_monitor: dict[str, Any]

    @classmethod
    def from_results(cls, path: Path, results: dict[str, Any]) -> Run:
        test = _numbers(results.get("test"))
        return cls(
            path=path,
            experiment=str(results.get("experiment") or path.parent.parent.name),
            method=str(results.get("method") or "unknown"),
            dataset=str(results.get("dataset") or ""),
            num_labels=results.get("num_labels"),
            seed=results.get("seed"),
            # Old results files have no "overrides": they ran as configured.
            variant=" ".join(sorted(results.get("overrides") or [])),
            global_step=results.get("global_step"),
            test=test,
            # The CLI writes test_raw = test when the method has no EMA; old files may lack it.
            test_raw=_numbers(results.get("test_raw")) or dict(test),
            test_monitor=dict(results.get("test_monitor") or {}),
        )

    @property
    def headline_metric(self) -> str:
        """The metric the method summarises in ``test_monitor`` (``last_<metric>``), else acc / cluster_acc."""
        for key in self.test_monitor:
            if key.startswith("last_"):
                return key[len("last_"):]
        for metric in ("acc", "cluster_acc"):
            if metric in self.test:
                return metric
        return next(iter(self.test), "acc")

    def value(self, weights: str, metric: str) -> float | None:
        """This run's ``metric`` under ``weights`` (one of :data:`WEIGHTS`), or None if it was not recorded."""
        if weights == "test":
            return self.test.get(metric)
        if weights == "test_raw":
            return self.test_raw.get(metric)
        key = (f"best_{metric}_test_selected_optimistic" if weights == "best_test_selected_optimistic"
               else f"mean_last_20_{metric}")
        value = self.test_monitor.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def metrics(self, weights: str) -> list[str]:
        """The metrics this run recorded under ``weights``."""
        if weights == "test":
            return list(self.test)
        if weights == "test_raw":
            return list(self.test_raw)
        pattern = _BEST_KEY if weights == "best_test_selected_optimistic" else _MEAN_LAST_KEY
        found = (pattern.match(key) for key in self.test_monitor)
        # best_step_test_selected_optimistic is the step of the best evaluation, not a metric.
        return [match.group(1) for match in found if match and match.group(1) != "step"]


def _numbers(values: Any) -> dict[str, float]:
    """The numeric entries of a metrics mapping (results.json may hold null for a metric that failed)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect_runs(runs_dir: str | Path, out_dir: str | Path) -> list[Run]:
    """Every readable ``results.json`` under ``runs_dir`` except those under ``out_dir`` (the report's own
    folder may sit inside ``runs/``). An unreadable file is reported and skipped: one half-written run must
    not hide all the others."""
    out = Path(out_dir).resolve()
    runs: list[Run] = []
    for path in find_results(runs_dir):
        if path.resolve().is_relative_to(out):
            continue
        try:
            results = load_results(path)
        except (OSError, json.JSONDecodeError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if isinstance(results, dict):
            runs.append(Run.from_results(path, results))
    return runs


def experiment_max_steps(experiments_dir: str | Path, experiment: str) -> int | None:
    """``trainer.max_steps`` of ``experiments/<experiment>.yaml``, or None when there is no such file or key
    (then no group of that experiment can be flagged as a short schedule)."""
    path = Path(experiments_dir) / f"{experiment}.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    steps = trainer.get("max_steps") if isinstance(trainer, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


# ----- groups -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1; None for a single run) of one metric over a group."""

    mean: float | None
    std: float | None
    n: int


def mean_std(values: Sequence[float]) -> Stat:
    """Sample std (ddof = 1), because the seeds are a sample of the run-to-run spread, not the population."""
    if not values:
        return Stat(None, None, 0)
    array = np.asarray(values, dtype=np.float64)
    return Stat(float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else None, int(array.size))


@dataclass
class Group:
    """The runs of one experiment with the same overrides: the unit that is averaged over seeds."""

    experiment: str
    variant: str
    runs: list[Run]
    max_steps: int | None = None
    superseded: int = 0  # older runs of a seed that a newer run of the same seed replaced
    _stats: dict[tuple[str, str], Stat] = field(default_factory=dict, repr=False)

    @property
    def method(self) -> str:
        return Counter(run.method for run in self.runs).most_common(1)[0][0]

    @property
    def dataset(self) -> str:
        return self.runs[0].dataset

    @property
    def num_labels(self) -> int | None:
        return self.runs[0].num_labels

    @property
    def seeds(self) -> list[Any]:
        return sorted((run.seed for run in self.runs), key=lambda seed: (seed is None, str(seed).zfill(12)))

    @property
    def steps(self) -> list[int]:
        return sorted(run.global_step for run in self.runs if isinstance(run.global_step, int))

    @property
    def steps_text(self) -> str:
        steps = self.steps
        if not steps:
            return "?"
        return str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}–{steps[-1]}"

    @property
    def short_schedule(self) -> bool:
        """Any run stopped before the configured ``max_steps``: a shortened schedule is a smoke run."""
        return self.max_steps is not None and any(step < self.max_steps for step in self.steps)

    @property
    def headline_metric(self) -> str:
        return Counter(run.headline_metric for run in self.runs).most_common(1)[0][0]

    def metrics(self, weights: str) -> list[str]:
        return sorted({metric for run in self.runs for metric in run.metrics(weights)})

    def stat(self, weights: str, metric: str) -> Stat:
        key = (weights, metric)
        if key not in self._stats:
            values = [run.value(weights, metric) for run in self.runs]
            self._stats[key] = mean_std([value for value in values if value is not None])
        return self._stats[key]

    def notes(self) -> list[str]:
        """Group-level warnings: what makes these numbers not (yet) comparable with a reference."""
        notes = []
        if self.short_schedule:
            notes.append(f"short schedule ({self.steps_text} of {self.max_steps} steps)")
        if self.superseded:
            notes.append(f"{self.superseded} older run(s) of the same seeds left out")
        return notes


def latest_per_seed(runs: Sequence[Run]) -> list[Run]:
    """The newest run of each seed (run directories are named ``<timestamp>-<seed>``): a seed counts once in a
    mean, and a re-run (after a fix, or at a newer commit) replaces the run it repeats."""
    latest: dict[Any, Run] = {}
    for run in sorted(runs, key=lambda run: run.path.parent.name):
        latest[run.seed] = run
    return list(latest.values())


def group_runs(runs: Sequence[Run], experiments_dir: str | Path = EXPERIMENTS_DIR) -> list[Group]:
    """One group per (experiment, variant), sorted by method, experiment and variant (as configured first)."""
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        grouped.setdefault((run.experiment, run.variant), []).append(run)
    max_steps = {experiment: experiment_max_steps(experiments_dir, experiment) for experiment, _ in grouped}
    groups = []
    for (experiment, variant), members in grouped.items():
        latest = latest_per_seed(members)
        groups.append(Group(experiment, variant, latest, max_steps[experiment], len(members) - len(latest)))
    return sorted(groups, key=lambda group: (group.method, group.experiment, group.variant))


# ----- formatting ---------------------------------------------------------------------------------------
def is_fraction_metric(metric: str) -> bool:
    """Accuracy-like metrics live in [0, 1] and are shown in %; MI (nats), NLL, counts and thresholds are not."""
    leaf = metric.rsplit("/", 1)[-1]
    return leaf not in NON_FRACTION_METRICS and not leaf.startswith("mi_") and "loss" not in leaf


def display_scale(metric: str) -> float:
    return 100.0 if is_fraction_metric(metric) else 1.0


def format_value(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.2f}" if is_fraction_metric(metric) else f"{value:.4f}"


def format_mean_std(mean: float | None, std: float | None, metric: str) -> str:
    if mean is None:
        return "—"
    text = format_value(mean, metric)
    return text if std is None else f"{text} ± {format_value(std, metric)}"


def format_delta(ours: float | None, reference: float, metric: str) -> str:
    """Ours minus the reference, in points (percentage points for fractions, the metric's unit otherwise)."""
    if ours is None:
        return "—"
    delta = (ours - reference) * display_scale(metric)
    return f"{delta:+.2f}" if is_fraction_metric(metric) else f"{delta:+.4f}"


def _cell(text: str) -> str:
    """Markdown table cells cannot hold a raw pipe or newline."""
    return text.replace("|", "\\|").replace("\n", " ")


def _csv_number(value: float | None) -> str:
    return "" if value is None else f"{value:.10g}"


def variant_label(variant: str) -> str:
    return f"`{variant}`" if variant else AS_CONFIGURED


# ----- CSV ----------------------------------------------------------------------------------------------
def csv_rows(groups: Sequence[Group], references: dict[str, list[Reference]]) -> list[dict[str, str]]:
    """Long-format rows: ours for every (group, weights, metric), repeated once per matching reference; then
    one row per reference that no run recorded (what remains to reproduce)."""
    rows: list[dict[str, str]] = []
    matched: set[tuple[str, str]] = set()
    for group in groups:
        for weights in WEIGHTS:
            for metric in group.metrics(weights):
                refs = [ref for ref in references.get(group.experiment, []) if ref.metric == metric]
                matched.update((ref.experiment, ref.metric) for ref in refs)
                rows.extend(_group_row(group, weights, metric, ref) for ref in (refs or [None]))
    for experiment, refs in references.items():
        rows.extend(_reference_row(ref) for ref in refs if (experiment, ref.metric) not in matched)
    return rows


def _group_row(group: Group, weights: str, metric: str, ref: Reference | None) -> dict[str, str]:
    stat = group.stat(weights, metric)
    notes = group.notes()
    if stat.n < len(group.runs):
        notes.append(f"recorded by {stat.n} of {len(group.runs)} runs")
    return {
        "experiment": group.experiment, "variant": group.variant, "method": group.method,
        "dataset": group.dataset, "num_labels": "" if group.num_labels is None else str(group.num_labels),
        "n_seeds": str(len(group.runs)), "seeds": " ".join(str(seed) for seed in group.seeds),
        "steps": group.steps_text, "short_schedule": str(group.short_schedule).lower(), "weights": weights,
        "metric": metric, "mean": _csv_number(stat.mean), "std": _csv_number(stat.std), **_reference_columns(ref),
        "notes": "; ".join(notes),
    }


def _reference_row(ref: Reference) -> dict[str, str]:
    empty = dict.fromkeys(CSV_COLUMNS, "")
    return {**empty, "experiment": ref.experiment, "n_seeds": "0", "metric": ref.metric, **_reference_columns(ref),
            "notes": "no run yet"}


def _reference_columns(ref: Reference | None) -> dict[str, str]:
    if ref is None:
        return {"reference": "", "reference_std": "", "reference_selection": "", "reference_source": ""}
    return {"reference": _csv_number(ref.value), "reference_std": _csv_number(ref.std),
            "reference_selection": ref.selection, "reference_source": ref.source}


def write_csv(path: Path, rows: Sequence[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ----- Markdown -----------------------------------------------------------------------------------------
HOW_TO_READ = """\
How to read it:
- **Ours** is the **last** checkpoint (`results.json` "test": EMA weights where the method keeps an EMA, else
  the raw weights), mean ± sample std (ddof = 1) over seeds; **raw** is the same runs' raw (non-EMA) weights.
  Accuracy-like metrics (accuracy, cluster accuracy, NMI, ARI, localisation rates) are in %; MI is in nats.
- A **best** of ours appears only in the notes, labelled *test-selected (optimistic)*: it is the maximum over
  the evaluations on the test set during training, which is not a valid model-selection protocol.
- **References** state their own selection (best = maximum over training, usually test-selected; last;
  unspecified) and source (`experiments/references/numbers.yaml`). Most published tables report best, which favours
  them against our last.
- **Δ** = ours (last) − reference, in points (percentage points; nats for MI).
- **short schedule**: the runs stopped before the experiment's `trainer.max_steps`. These are smoke runs and
  are never comparable with the references.
- **variant**: the command-line overrides of the runs (`as configured` = none); a reference applies to the
  experiment as configured."""

TABLE_HEADER = ("| experiment | variant | seeds (n) | steps | metric | ours, EMA/last | raw | reference | Δ | notes |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def markdown_report(groups: Sequence[Group], references: dict[str, list[Reference]], runs_dir: Path,
                    references_path: Path, n_runs: int) -> str:
    """The whole Markdown document: title, reading guide, one table per method, unreproduced references."""
    parts = [
        "# Results report",
        f"{n_runs} runs in {len(groups)} groups from `{runs_dir}`; references from `{references_path}`.",
        HOW_TO_READ,
    ]
    if not groups:
        parts.append(f"**{NO_RUNS_MESSAGE.format(runs=runs_dir)}**")
    methods = sorted({group.method for group in groups})
    for method in methods:
        rows = [row for group in groups if group.method == method for row in _markdown_rows(group, references)]
        parts.append(f"## {method}\n\n{TABLE_HEADER}\n" + "\n".join(rows))
    parts.append(_unreproduced_section(groups, references))
    return "\n\n".join(parts) + "\n"


def _table_metrics(group: Group, references: dict[str, list[Reference]]) -> list[str]:
    """The headline metric first, then every other metric a reference exists for."""
    metrics = [group.headline_metric]
    for ref in references.get(group.experiment, []):
        if ref.metric not in metrics:
            metrics.append(ref.metric)
    return metrics


def _markdown_rows(group: Group, references: dict[str, list[Reference]]) -> list[str]:
    rows = []
    seeds = f"{', '.join(str(seed) for seed in group.seeds)} ({len(group.runs)})"
    for metric in _table_metrics(group, references):
        ours, raw = group.stat("test", metric), group.stat("test_raw", metric)
        refs = [ref for ref in references.get(group.experiment, []) if ref.metric == metric]
        reference = "<br>".join(
            f"{format_mean_std(ref.value, ref.std, metric)} ({ref.selection}; {ref.source})" for ref in refs)
        # A shortened schedule is a smoke run: no Δ, so it cannot be read as a reproduction.
        delta = "n/a (short schedule)" if refs and group.short_schedule else "<br>".join(
            format_delta(ours.mean, ref.value, metric) for ref in refs)
        cells = [group.experiment, variant_label(group.variant), seeds, group.steps_text, metric,
                 format_mean_std(ours.mean, ours.std, metric), format_mean_std(raw.mean, raw.std, metric),
                 reference or "—", delta or "—", "; ".join(_row_notes(group, metric)) or ""]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return rows


def _row_notes(group: Group, metric: str) -> list[str]:
    notes = group.notes()
    best = group.stat("best_test_selected_optimistic", metric)
    if best.mean is not None:
        notes.append(f"best {format_mean_std(best.mean, best.std, metric)} (test-selected, optimistic)")
    if group.stat("test", metric).n < len(group.runs):
        notes.append(f"recorded by {group.stat('test', metric).n} of {len(group.runs)} runs")
    return notes


def _unreproduced_section(groups: Sequence[Group], references: dict[str, list[Reference]]) -> str:
    """Experiments that have references but no run at all: the to-do list of the reproduction, one row per
    (experiment, metric); the full sources are in report.csv and the references file."""
    trained = {group.experiment for group in groups}
    missing: dict[tuple[str, str], list[Reference]] = {}
    for experiment, refs in references.items():
        for ref in refs:
            if experiment not in trained:
                missing.setdefault((experiment, ref.metric), []).append(ref)
    title = "## References not yet reproduced"
    if not missing:
        return f"{title}\n\nEvery experiment with a reference has at least one run."
    lines = [f"{title}\n", f"{len({experiment for experiment, _ in missing})} experiments without a run. Train "
             "with `make train EXP=<experiment>`; full sources in `report.csv`.\n",
             "| experiment | metric | references (value ± std, selection, source) |", "|---|---|---|"]
    for (experiment, metric), refs in missing.items():
        cell = "<br>".join(f"{format_mean_std(ref.value, ref.std, metric)} ({ref.selection}; {_short_source(ref)})"
                           for ref in refs)
        lines.append("| " + " | ".join(_cell(text) for text in (experiment, metric, cell)) + " |")
    return "\n".join(lines)


def _short_source(ref: Reference) -> str:
    """The source up to its first comma: the table's name (\"USB-2022 spreadsheet\", \"SimMatch paper\")."""
    return ref.source.split(",", 1)[0].strip()


# ----- plot ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlotRow:
    """One line of the dot plot: our mean ± std and the references, already in display units."""

    label: str
    mean: float
    std: float
    references: tuple[tuple[float, float, str], ...]  # (value, std or 0, selection)
    percent: bool
    short: bool


REFERENCE_MARKERS = {"best": ("^", "tab:red"), "last": ("s", "tab:blue"), "mean_last_20": ("v", "tab:purple"),
                     "unspecified": ("D", "tab:orange")}


def plot_rows(groups: Sequence[Group], references: dict[str, list[Reference]]) -> list[PlotRow]:
    """Every (group, metric) with both our runs and a reference; if none, each group's headline alone.
    Short-schedule groups are never drawn beside a reference: they are not comparable."""
    rows = [row for group in groups if not group.short_schedule for metric in _table_metrics(group, references)
            if (row := _plot_row(group, metric, references)) is not None and row.references]
    if rows:
        return rows
    rows = [_plot_row(group, group.headline_metric, {}) for group in groups]
    return [row for row in rows if row is not None]


def _plot_row(group: Group, metric: str, references: dict[str, list[Reference]]) -> PlotRow | None:
    stat = group.stat("test", metric)
    if stat.mean is None:
        return None
    scale = display_scale(metric)
    refs = tuple((ref.value * scale, (ref.std or 0.0) * scale, ref.selection)
                 for ref in references.get(group.experiment, []) if ref.metric == metric)
    variant = f" [{group.variant}]" if group.variant else ""
    short = " (short schedule)" if group.short_schedule else ""
    return PlotRow(f"{group.experiment}{variant} · {metric}{short}", stat.mean * scale, (stat.std or 0.0) * scale,
                   refs, is_fraction_metric(metric), group.short_schedule)


def write_plot(path: Path, rows: Sequence[PlotRow], message: str | None = None) -> None:
    """A horizontal dot plot, one panel for % metrics and one for the rest (nats); the height grows with the
    number of rows. The object API (no pyplot) keeps the Agg backend local to this figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [[row for row in rows if row.percent], [row for row in rows if not row.percent]]
    panels = [panel for panel in panels if panel]
    height = 1.2 + sum(0.9 + 0.32 * len(panel) for panel in panels) if panels else 3.0
    figure = Figure(figsize=(11, height), layout="constrained")
    FigureCanvasAgg(figure)
    if not panels:
        axis = figure.add_subplot()
        axis.axis("off")
        axis.text(0.5, 0.5, message or "No runs to plot.", ha="center", va="center", wrap=True, fontsize=12)
    else:
        axes = figure.subplots(len(panels), 1, squeeze=False,
                               gridspec_kw={"height_ratios": [len(panel) + 2 for panel in panels]})
        for axis, panel in zip(axes[:, 0], panels, strict=True):
            _draw_panel(axis, panel)
        title = ("Ours (last checkpoint, mean ± sample std over seeds) vs references" if any(row.references for row in rows)
                 else "Ours (last checkpoint, mean ± sample std over seeds), headline metric: no reference matches")
        figure.suptitle(title)
    figure.savefig(path, dpi=110)


def _draw_panel(axis: Any, rows: Sequence[PlotRow]) -> None:
    positions = np.arange(len(rows))[::-1]
    for y, row in zip(positions, rows, strict=True):
        color = "tab:gray" if row.short else "black"
        axis.errorbar(row.mean, y, xerr=row.std, fmt="o", color=color, capsize=3, zorder=4,
                      label="ours" if not row.short else "ours (short schedule)")
        for value, std, selection in row.references:
            marker, ref_color = REFERENCE_MARKERS.get(selection, ("x", "tab:green"))
            axis.errorbar(value, y, xerr=std, fmt=marker, color=ref_color, capsize=2, alpha=0.8, zorder=3,
                          label=f"reference ({selection})")
    axis.set_yticks(positions, [row.label for row in rows], fontsize=8)
    axis.set_ylim(-1, len(rows))
    axis.set_xlabel("%" if rows[0].percent else "value (nats for MI)")
    axis.grid(axis="x", alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axis.legend(unique.values(), unique.keys(), fontsize=8, loc="best")


# ----- entry point --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportFiles:
    csv: Path
    png: Path
    markdown: Path
    n_runs: int
    groups: list[Group]


def build_report(runs_dir: str | Path = DEFAULT_RUNS, out_dir: str | Path = DEFAULT_OUT,
                 references_path: str | Path = DEFAULT_REFERENCES,
                 experiments_dir: str | Path = EXPERIMENTS_DIR) -> ReportFiles:
    """Collect, group, and write the three files; with no runs the files still list the references."""
    runs_dir, out_dir, references_path = Path(runs_dir), Path(out_dir), Path(references_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = load_references(references_path)
    runs = collect_runs(runs_dir, out_dir)
    groups = group_runs(runs, experiments_dir)
    files = ReportFiles(out_dir / "report.csv", out_dir / "report.png", out_dir / "report.md", len(runs), groups)
    write_csv(files.csv, csv_rows(groups, references))
    write_plot(files.png, plot_rows(groups, references), NO_RUNS_MESSAGE.format(runs=runs_dir))
    files.markdown.write_text(markdown_report(groups, references, runs_dir, references_path, len(runs)))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="folder searched for results.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where report.{md,csv,png} go")
    parser.add_argument("--references", type=Path, default=DEFAULT_REFERENCES, help="references YAML")
    args = parser.parse_args(argv)
    files = build_report(args.runs, args.out, args.references)
    if files.n_runs == 0:
        print(NO_RUNS_MESSAGE.format(runs=args.runs))
    else:
        print(f"{files.n_runs} runs in {len(files.groups)} groups")
    print(files.csv)
    print(files.png)
    print(files.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
