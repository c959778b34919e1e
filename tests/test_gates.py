"""Quality gates on the embedded digits set: each trains the shipped config, unchanged, on 2 seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import GATE_SEEDS, mean_test_acc, train_digits


@pytest.mark.slow
def test_fixmatch_beats_supervised_on_digits_40(supervised_digits_40: list[dict], tmp_path: Path) -> None:
    fixmatch = train_digits("fixmatch_digits_40", GATE_SEEDS, tmp_path)
    supervised_acc, fixmatch_acc = mean_test_acc(supervised_digits_40), mean_test_acc(fixmatch)
    print(f"digits@40 test acc (EMA, last): supervised {[r['test']['acc'] for r in supervised_digits_40]} "
          f"fixmatch {[r['test']['acc'] for r in fixmatch]}")
    assert fixmatch_acc >= supervised_acc + 0.03
