"""Execute the exploration notebooks: ``python -m ssl_lightning.notebooks [--tiny] [--out DIR] [NAME ...]``.

Notebooks are stored with their outputs stripped; executing one writes an executed copy under ``--out``
(``runs/notebooks`` by default), never over the tracked file. ``--tiny`` sets
``SSL_LIGHTNING_NOTEBOOK_TINY=1``: every notebook reads it and shrinks its training runs and problem sizes,
so the tests can execute all of them in seconds. Training runs started by a notebook go under
``SSL_LIGHTNING_NOTEBOOK_RUNS`` (default ``runs/``) and their datasets under ``SSL_LIGHTNING_NOTEBOOK_DATA``
(default ``data/``); a notebook reads all three through :func:`settings`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ssl_lightning.runs import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
TINY_ENV = "SSL_LIGHTNING_NOTEBOOK_TINY"
RUNS_ENV = "SSL_LIGHTNING_NOTEBOOK_RUNS"
DATA_ENV = "SSL_LIGHTNING_NOTEBOOK_DATA"


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook needs from whoever runs it; the same whether it is opened in Jupyter (working
    directory ``notebooks/``) or executed by ``make notebooks`` and the tests."""

    tiny: bool
    run_root: Path
    data_dir: Path


def settings() -> NotebookSettings:
    return NotebookSettings(
        tiny=os.environ.get(TINY_ENV) == "1",
        run_root=Path(os.environ.get(RUNS_ENV, REPO_ROOT / "runs")),
        data_dir=Path(os.environ.get(DATA_ENV, REPO_ROOT / "data")),
    )


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def unstripped_cells(path: Path) -> list[int]:
    """Indices of the code cells that still carry outputs or an execution count (tracked notebooks carry none)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return [
        index for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]


def strip(path: Path) -> None:
    """Remove every output and execution count, in place (run before committing an edited notebook)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(notebook, path)


def execute(path: Path, out_dir: Path, timeout_s: int = 3600) -> Path:
    """Execute a notebook with the repository root as working directory and write the executed copy to
    ``out_dir``. Any cell that raises fails the whole call (``nbclient.exceptions.CellExecutionError``)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    kernel = notebook.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(
        notebook, timeout=timeout_s, kernel_name=kernel, resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    try:
        client.execute()
    finally:  # the partial notebook shows where it failed
        nbformat.write(notebook, executed)
    return executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 01_quickstart")
    parser.add_argument("--tiny", action="store_true", help="tiny settings (what the tests run)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "notebooks", help="executed copies")
    parser.add_argument("--strip", action="store_true", help="strip outputs in place instead of executing")
    args = parser.parse_args(argv)

    paths = notebook_paths()
    if args.names:
        known = {path.stem: path for path in paths}
        unknown = [name for name in args.names if name.removesuffix(".ipynb") not in known]
        if unknown:
            parser.error(f"unknown notebook(s) {unknown}; available: {sorted(known)}")
        paths = [known[name.removesuffix(".ipynb")] for name in args.names]
    if args.strip:
        for path in paths:
            strip(path)
            print(f"stripped {path.relative_to(REPO_ROOT)}")
        return 0
    if args.tiny:
        os.environ[TINY_ENV] = "1"
    from nbclient.exceptions import CellExecutionError

    failed = []
    for path in paths:
        started = time.time()
        try:
            executed = execute(path, args.out)
        except CellExecutionError as error:
            failed.append(path.name)
            print(f"FAILED {path.name}: {str(error).splitlines()[-1] if str(error) else error}", file=sys.stderr)
            continue
        print(f"{path.name}: executed in {time.time() - started:.0f} s -> {executed}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {failed}; the executed copies under {args.out} show where",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
