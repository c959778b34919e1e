"""Quality gates on the embedded digits set: each trains the shipped config, unchanged, on 2 seeds.

Accuracies are the EMA weights' test accuracy at the last step (``results.json`` ``test.acc``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import GATE_SEEDS, mean_test_acc, train_digits


def _report(name: str, results: list[dict]) -> str:
    return f"{name} {[round(r['test']['acc'], 4) for r in results]} mean {mean_test_acc(results):.4f}"


@pytest.mark.slow
def test_fixmatch_beats_supervised_on_digits_40(supervised_digits_40: list[dict],
                                                fixmatch_digits_40: list[dict]) -> None:
    print(_report("supervised", supervised_digits_40), _report("fixmatch", fixmatch_digits_40))
    assert mean_test_acc(fixmatch_digits_40) >= mean_test_acc(supervised_digits_40) + 0.03


@pytest.mark.slow
def test_infomatch_gate_on_digits_40(supervised_digits_40: list[dict], fixmatch_digits_40: list[dict],
                                     tmp_path: Path) -> None:
    infomatch = train_digits("infomatch_digits_40", GATE_SEEDS, tmp_path)
    print(_report("supervised", supervised_digits_40), _report("fixmatch", fixmatch_digits_40),
          _report("infomatch", infomatch))
    assert mean_test_acc(infomatch) >= mean_test_acc(supervised_digits_40) + 0.03
    assert mean_test_acc(infomatch) >= mean_test_acc(fixmatch_digits_40) - 0.01
