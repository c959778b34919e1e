"""Shared test setup: no W&B, few threads, generated datasets in the official formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset, tiny, written once per session in its official on-disk format."""
    from tests.fixtures.formats import write_all

    root = tmp_path_factory.mktemp("datasets")
    write_all(root)
    return root


@pytest.fixture(scope="session")
def supervised_digits_40(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The supervised baseline every digits gate compares against, trained once per session."""
    from tests.helpers import GATE_SEEDS, train_digits

    return train_digits("supervised_digits_40", GATE_SEEDS, tmp_path_factory.mktemp("supervised"))


@pytest.fixture(scope="session")
def fixmatch_digits_40(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The FixMatch digits runs, trained once per session for every gate that compares against them."""
    from tests.helpers import GATE_SEEDS, train_digits

    return train_digits("fixmatch_digits_40", GATE_SEEDS, tmp_path_factory.mktemp("fixmatch"))
