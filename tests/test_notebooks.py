"""The notebooks are stored without outputs and execute from top to bottom on tiny settings."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from ssl_lightning.notebooks import (
    DATA_ENV,
    RUNS_ENV,
    TINY_ENV,
    execute,
    notebook_paths,
    strip,
    unstripped_cells,
)

EXPECTED = {"01_quickstart", "02_losses", "03_pseudo_label_dynamics", "04_infocam_overlays", "05_em_solver_speed"}


def test_every_notebook_is_there() -> None:
    assert {path.stem for path in notebook_paths()} == EXPECTED


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    assert unstripped_cells(path) == [], f"strip it: .venv/bin/python -m ssl_lightning.notebooks --strip {path.stem}"


def test_strip_removes_outputs(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    notebook.cells = [nbformat.v4.new_markdown_cell("# title"), cell]
    path = tmp_path / "example.ipynb"
    nbformat.write(notebook, path)
    assert unstripped_cells(path) == [1]
    strip(path)
    assert unstripped_cells(path) == []


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_executes_on_tiny_settings(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TINY_ENV, "1")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    executed = nbformat.read(execute(path, tmp_path / "executed", timeout_s=600), as_version=4)
    outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert figures, "every notebook draws at least one figure"
