"""Quality gates on the embedded digits set: each trains the shipped config, unchanged, on 2 seeds.

Accuracies are the EMA weights' test accuracy at the last step (``results.json`` ``test.acc``). Each gate
trains its own method first and then reads the baselines, which another worker may already have trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from tests.helpers import mean_test_acc, train_log

Gate = Callable[[str], list[dict]]


def _report(**runs: list[dict]) -> str:
    return "; ".join(f"{name} {[round(r['test']['acc'], 4) for r in results]} mean {mean_test_acc(results):.4f}"
                     for name, results in runs.items())


@pytest.mark.slow
def test_fixmatch_beats_supervised_on_digits_40(digits_gate: Gate) -> None:
    fixmatch = digits_gate("fixmatch_digits_40")
    supervised = digits_gate("supervised_digits_40")
    print(_report(supervised=supervised, fixmatch=fixmatch))
    assert mean_test_acc(fixmatch) >= mean_test_acc(supervised) + 0.03


@pytest.mark.slow
def test_infomatch_gate_on_digits_40(digits_gate: Gate) -> None:
    infomatch = digits_gate("infomatch_digits_40")
    supervised, fixmatch = digits_gate("supervised_digits_40"), digits_gate("fixmatch_digits_40")
    print(_report(supervised=supervised, fixmatch=fixmatch, infomatch=infomatch))
    assert mean_test_acc(infomatch) >= mean_test_acc(supervised) + 0.03
    assert mean_test_acc(infomatch) >= mean_test_acc(fixmatch) - 0.01


@pytest.mark.slow
def test_simmatch_gate_on_digits_40(digits_gate: Gate) -> None:
    simmatch = digits_gate("simmatch_digits_40")
    supervised = digits_gate("supervised_digits_40")
    print(_report(supervised=supervised, simmatch=simmatch))
    assert mean_test_acc(simmatch) >= mean_test_acc(supervised) + 0.03
    # Spec §7.4: finite losses, a mask rate that rose above 0, every bank slot written by T_w.
    for result in simmatch:
        log = train_log(result)
        assert log["bank_visited_fraction"][-1] == 1.0
        assert max(log["mask_rate"]) > 0
        assert all(math.isfinite(v) for v in log["loss"] + log["instance_loss"])
