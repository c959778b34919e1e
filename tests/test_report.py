"""``make report`` (ssl_lightning.report) on fake run directories: statistics, grouping, flags, the reference
join, the three output files, and the schema of the shipped ``experiments/references/numbers.yaml``. No training."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ssl_lightning import report
from ssl_lightning.runs import REPO_ROOT

EXPERIMENTS = REPO_ROOT / "experiments"
DEMO = "fixmatch_digits_40"
LONG = "fixmatch_cifar10_40"


def max_steps(experiment: str) -> int:
    return int(yaml.safe_load((EXPERIMENTS / f"{experiment}.yaml").read_text())["trainer"]["max_steps"])


def write_run(runs: Path, experiment: str, seed: int, acc: float, *, raw_acc: float | None = None,
              step: int | None = None, overrides: list[str] | None = None, stamp: str = "20260101-000000",
              method: str = "fixmatch", best_acc: float | None = None) -> Path:
    """A results.json with the layout cli.py ``_write_results`` writes (``overrides`` omitted when None, as in
    files written before the field existed)."""
    test = {"acc": acc, "acc_top5": 1.0, "ece": 0.02, "macro_f1": acc - 0.01, "nll": 0.3}
    monitor: dict[str, Any] = {"evaluations": 0}
    if best_acc is not None:
        monitor = {"evaluations": 4, "last_acc": acc, "mean_last_20_acc": acc - 0.05,
                   "best_acc_test_selected_optimistic": best_acc, "best_step_test_selected_optimistic": 900}
    results: dict[str, Any] = {
        "experiment": experiment, "method": method, "dataset": "digits", "num_labels": 40, "seed": seed,
        "split_sha256": "0" * 64, "git_commit": "abc", "global_step": max_steps(experiment) if step is None else step,
        "wall_time_s": 1.0, "train_images_per_s": 100.0, "test": test,
        "test_raw": {**test, "acc": acc if raw_acc is None else raw_acc}, "headline_weights": "ema",
        "test_monitor": monitor, "label_protocol": None, "devices": 1, "precision": "32-true", "ckpt_path": None,
    }
    if overrides is not None:
        results["overrides"] = overrides
    run_dir = runs / experiment / f"{stamp}-{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def rows_for(rows: list[dict[str, str]], **match: str) -> list[dict[str, str]]:
    return [row for row in rows if all(row[key] == value for key, value in match.items())]


def run_report(tmp_path: Path, references: Path | None = None) -> report.ReportFiles:
    return report.build_report(tmp_path / "runs", tmp_path / "runs" / "report",
                               references or tmp_path / "no_references.yaml")


def test_mean_and_sample_std_in_all_three_files(tmp_path: Path) -> None:
    for seed, acc in enumerate((0.90, 0.92, 0.94)):
        write_run(tmp_path / "runs", DEMO, seed, acc, raw_acc=0.80 + 0.01 * seed, overrides=[])
    files = run_report(tmp_path)
    (row,) = rows_for(read_csv(files.csv), experiment=DEMO, weights="test", metric="acc")
    assert float(row["mean"]) == pytest.approx(0.92)
    assert float(row["std"]) == pytest.approx(0.02)  # sample std (ddof = 1)
    assert (row["n_seeds"], row["seeds"], row["short_schedule"], row["variant"]) == ("3", "0 1 2", "false", "")
    (raw,) = rows_for(read_csv(files.csv), experiment=DEMO, weights="test_raw", metric="acc")
    assert float(raw["mean"]) == pytest.approx(0.81) and float(raw["std"]) == pytest.approx(0.01)
    markdown = files.markdown.read_text()
    assert "## fixmatch" in markdown
    assert f"| {DEMO} | as configured | 0, 1, 2 (3) | {max_steps(DEMO)} | acc | 92.00 ± 2.00 | 81.00 ± 1.00 |" in markdown
    assert files.png.is_file() and files.png.stat().st_size > 1000


def test_single_seed_has_no_std(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", DEMO, 0, 0.9)
    (row,) = rows_for(read_csv(run_report(tmp_path).csv), weights="test", metric="acc")
    assert row["std"] == "" and float(row["mean"]) == pytest.approx(0.9)


def test_variants_are_grouped_apart_and_override_order_does_not_matter(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, DEMO, 0, 0.90)  # an old file without "overrides": as configured
    write_run(runs, DEMO, 1, 0.92, overrides=[])
    write_run(runs, DEMO, 0, 0.50, overrides=["--model.lambda_u=2", "--data.batch_size=8"], stamp="20260102-000000")
    write_run(runs, DEMO, 1, 0.60, overrides=["--data.batch_size=8", "--model.lambda_u=2"], stamp="20260102-000000")
    files = run_report(tmp_path)
    assert [(group.variant, len(group.runs)) for group in files.groups] == [
        ("", 2), ("--data.batch_size=8 --model.lambda_u=2", 2)]
    rows = rows_for(read_csv(files.csv), weights="test", metric="acc")
    assert {row["variant"]: float(row["mean"]) for row in rows} == pytest.approx(
        {"": 0.91, "--data.batch_size=8 --model.lambda_u=2": 0.55})
    markdown = files.markdown.read_text()
    assert "| `--data.batch_size=8 --model.lambda_u=2` | 0, 1 (2) |" in markdown
    assert "| as configured | 0, 1 (2) |" in markdown


def test_short_schedule_is_flagged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    full = max_steps(LONG)
    write_run(runs, LONG, 0, 0.3, step=100, overrides=["--trainer.max_steps=100"])
    write_run(runs, LONG, 0, 0.9, step=full, overrides=[], stamp="20260102-000000")
    files = run_report(tmp_path)
    rows = rows_for(read_csv(files.csv), experiment=LONG, weights="test", metric="acc")
    flags = {row["variant"]: row["short_schedule"] for row in rows}
    assert flags == {"--trainer.max_steps=100": "true", "": "false"}
    assert all("short schedule" in row["notes"] for row in rows if row["variant"])
    assert f"short schedule (100 of {full} steps)" in files.markdown.read_text()


def test_a_rerun_of_a_seed_replaces_the_older_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, DEMO, 0, 0.90, step=500)
    write_run(runs, DEMO, 0, 0.92, stamp="20260102-000000")
    write_run(runs, DEMO, 1, 0.96)
    (group,) = run_report(tmp_path).groups
    assert group.seeds == [0, 1] and group.superseded == 1
    stat = group.stat("test", "acc")
    assert stat.n == 2 and abs(stat.mean - 0.94) < 1e-12  # the newer seed-0 run (0.92) and seed 1 (0.96)
    assert not group.short_schedule  # the 500-step run was replaced
    assert "1 older run(s) of the same seeds left out" in group.notes()


def test_reference_join_and_unreproduced_references(tmp_path: Path) -> None:
    refs = tmp_path / "refs.yaml"
    refs.write_text(yaml.safe_dump({
        DEMO: [{"metric": "acc", "value": 0.95, "std": 0.01, "selection": "best", "source": "fake table 1"},
               {"metric": "acc", "value": 0.93, "selection": "last", "source": "fake table 2"}],
        LONG: [{"metric": "acc", "value": 0.9167, "std": 0.0141, "selection": "best", "source": "fake USB"}],
    }))
    for seed, acc in enumerate((0.90, 0.92, 0.94)):
        write_run(tmp_path / "runs", DEMO, seed, acc, best_acc=acc + 0.02)
    files = run_report(tmp_path, refs)
    rows = read_csv(files.csv)
    joined = rows_for(rows, experiment=DEMO, weights="test", metric="acc")
    assert [(row["reference"], row["reference_std"], row["reference_selection"], row["reference_source"])
            for row in joined] == [("0.95", "0.01", "best", "fake table 1"), ("0.93", "", "last", "fake table 2")]
    assert all(float(row["mean"]) == pytest.approx(0.92) for row in joined)
    (best,) = rows_for(rows, experiment=DEMO, weights="best_test_selected_optimistic", metric="acc")[:1]
    assert float(best["mean"]) == pytest.approx(0.94)
    assert rows_for(rows, experiment=DEMO, weights="test", metric="ece")[0]["reference"] == ""
    (missing,) = rows_for(rows, experiment=LONG)
    assert (missing["n_seeds"], missing["mean"], missing["reference"]) == ("0", "", "0.9167")
    markdown = files.markdown.read_text()
    assert "95.00 ± 1.00 (best; fake table 1)<br>93.00 (last; fake table 2) | -3.00<br>-1.00 |" in markdown
    assert "best 94.00 ± 2.00 (test-selected, optimistic)" in markdown
    unreproduced = markdown.split("## References not yet reproduced", 1)[1]
    assert f"| {LONG} | acc | 91.67 ± 1.41 (best; fake USB) |" in unreproduced
    assert DEMO not in unreproduced


def test_bad_reference_schema_is_rejected(tmp_path: Path) -> None:
    refs = tmp_path / "refs.yaml"
    refs.write_text(yaml.safe_dump({DEMO: [{"metric": "acc", "value": 0.9, "selection": "max", "source": "x"}]}))
    with pytest.raises(ValueError, match="selection"):
        report.load_references(refs)
    refs.write_text(yaml.safe_dump({DEMO: [{"metric": "acc", "value": 0.9, "selection": "best", "source": "x",
                                            "seeds": 3}]}))
    with pytest.raises(ValueError, match="unknown keys"):
        report.load_references(refs)


def test_shipped_references_follow_the_schema() -> None:
    raw = yaml.safe_load(report.DEFAULT_REFERENCES.read_text())
    assert isinstance(raw, dict) and raw
    for experiment, entries in raw.items():
        assert (EXPERIMENTS / f"{experiment}.yaml").is_file(), experiment
        assert isinstance(entries, list) and entries, experiment
        for entry in entries:
            assert set(entry) <= set(report.REFERENCE_KEYS), (experiment, entry)
            assert isinstance(entry["metric"], str) and entry["metric"], (experiment, entry)
            assert entry["selection"] in report.SELECTIONS, (experiment, entry)
            assert isinstance(entry["source"], str) and entry["source"].strip(), (experiment, entry)
            values = [entry["value"]] + ([entry["std"]] if "std" in entry else [])
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), (experiment, entry)
            if report.is_fraction_metric(entry["metric"]):
                assert all(0.0 <= v <= 1.0 for v in values), (experiment, entry)
    loaded = report.load_references(report.DEFAULT_REFERENCES)
    assert sum(map(len, loaded.values())) == sum(map(len, raw.values()))


def test_no_runs_still_writes_the_files_and_says_how_to_train(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert report.main(["--runs", str(tmp_path / "empty"), "--out", str(out),
                        "--references", str(report.DEFAULT_REFERENCES)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "make train EXP=" in lines[0]
    assert lines[-3:] == [str(out / "report.csv"), str(out / "report.png"), str(out / "report.md")]
    assert (out / "report.png").stat().st_size > 0
    assert "make train EXP=" in (out / "report.md").read_text()
    rows = read_csv(out / "report.csv")
    assert rows and all(row["n_seeds"] == "0" and row["mean"] == "" for row in rows)
    assert rows_for(rows, experiment="infomatch_cifar10_40", metric="acc")


def test_results_inside_the_output_folder_are_ignored(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, DEMO, 0, 0.9)
    write_run(runs / "report", DEMO, 1, 0.1)  # e.g. a copy left in the report folder
    files = run_report(tmp_path)
    assert files.n_runs == 1
    (group,) = files.groups
    assert group.seeds == [0]
