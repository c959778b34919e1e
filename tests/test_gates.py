"""Quality gates on the embedded digits set: each trains the shipped config, unchanged, on 2 seeds.

Accuracies are the EMA weights' test accuracy at the last step (``results.json`` ``test.acc``). Each gate
trains its own method first and then reads the baselines, which another worker may already have trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from tests.helpers import GATE_SEEDS, experiment_config, mean_test_acc, train_log

Gate = Callable[..., list[dict]]
# Longest first; each (experiment, seed) is its own test, and xdist hands them out two at a time
# (--maxschedchunk=2 in the Makefile), so the workers share the runs out evenly.
GATE_EXPERIMENTS = ["infomatch_digits_40", "uwbssl_digits_40", "simmatch_digits_40", "fixmatch_digits_40",
                    "supervised_digits_40"]


def _report(**runs: list[dict]) -> str:
    return "; ".join(f"{name} {[round(r['test']['acc'], 4) for r in results]} mean {mean_test_acc(results):.4f}"
                     for name, results in runs.items())


@pytest.mark.slow
@pytest.mark.parametrize("experiment,seed", [(e, s) for s in GATE_SEEDS for e in GATE_EXPERIMENTS])
def test_digits_config_trains_to_completion(digits_gate: Gate, experiment: str, seed: int) -> None:
    """Every gate run: the shipped config, unchanged, runs all its steps and reports finite metrics."""
    (result,) = digits_gate(experiment, seeds=[seed])
    assert result["global_step"] == experiment_config(experiment)["trainer"]["max_steps"]
    assert all(math.isfinite(v) for v in [*result["test"].values(), *result["test_raw"].values()])
    assert all(math.isfinite(v) for v in train_log(result)["loss"])


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
        assert all(math.isfinite(v) for v in log["instance_loss"])


@pytest.mark.slow
def test_uwbssl_gate_on_digits_40(digits_gate: Gate) -> None:
    uwbssl = digits_gate("uwbssl_digits_40")
    supervised = digits_gate("supervised_digits_40")
    print(_report(supervised=supervised, uwbssl=uwbssl))
    assert mean_test_acc(uwbssl) >= mean_test_acc(supervised) + 0.03
    for result in uwbssl:
        log = train_log(result)
        # The gate admits samples and the early clamp keeps the threshold inside [0.2, 0.8] at first.
        assert max(log["gate_rate"]) > 0
        assert 0.2 - 1e-6 <= log["entropy_threshold"][0] <= 0.8 + 1e-6
