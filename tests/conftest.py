"""Shared test setup: no W&B, few threads, generated datasets in the official formats, gate runs.

The suite runs under pytest-xdist (``make test``: one worker per core). Each worker then uses one
intra-op thread: on 2 cores, two single-threaded digits runs side by side finish in the time one
two-threaded run takes. Quality-gate runs are shared by every worker through a file lock, so a
baseline such as ``supervised_digits_40`` is trained once per session wherever it is first needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ.setdefault("OMP_NUM_THREADS", "1" if _WORKER else "2")

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    if _WORKER:
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The long gate runs first, then the multi-process DDP runs: xdist's load scheduler hands tests out
    # a few at a time as workers free up, so the short tests fill in around the long ones instead of a
    # long test starting at the end while the other worker idles.
    # The gates' comparisons go last: they read runs the training tests produce, and one picked up early
    # would idle its worker on the file lock while the other worker trains.
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow"):
            return 0 if "trains_to_completion" in item.name else 3
        return 1 if item.get_closest_marker("ddp") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset, tiny, written once per session in its official on-disk format."""
    from tests.fixtures.formats import write_all
    from tests.fixtures.localization import write_localization_datasets

    root = tmp_path_factory.mktemp("datasets")
    write_all(root)
    write_localization_datasets(root)
    return root


@pytest.fixture(scope="session")
def digits_gate(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[dict]]:
    """``digits_gate(experiment, seeds=GATE_SEEDS)``: the shipped digits config trained per seed, once per
    session across all workers (the base temp directory's parent is shared by the xdist workers)."""
    from tests.helpers import GATE_SEEDS, shared_digits_run

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if _WORKER else base) / "digits-gates"
    root.mkdir(parents=True, exist_ok=True)
    return lambda experiment, seeds=tuple(GATE_SEEDS): [shared_digits_run(experiment, s, root) for s in seeds]
