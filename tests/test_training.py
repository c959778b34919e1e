"""Training-loop guarantees: exact resume, NaN guard, and GPU-count-invariant DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, checkpoint_weights, read_results, run_cli

# Every method that keeps state across steps: resume and DDP must reproduce that state too.
STATEFUL = ["fixmatch_digits_40", "infomatch_digits_40", "simmatch_digits_40", "uwbssl_digits_40"]
# Settings that bring all of a method's state into these few steps (SimMatch: propagation and L_in from
# step 2, so the bank, the DA window and the instance loss are all exercised; uwbssl: distribution
# alignment on, next to its entropy statistics).
PHASES = {"simmatch_digits_40": ["--model.instance_warmup_steps=2"], "uwbssl_digits_40": ["--model.da.enabled=true"]}
# The DDP check runs SimMatch with its EMA teacher and shuffle-BN: that path all-gathers images,
# permutes the global batch and restores the order, on top of the bank and DA synchronisation the
# online teacher shares, and compares the state checksums of all ranks every step. With a BatchNorm-free
# net the shuffle must change nothing.
DDP_VARIANT = {"simmatch_digits_40": ["--model.teacher=ema", "--model.teacher_bn=shuffle", "--model.state_check_every=1"]}


def _short(tmp_path: Path, steps: int, experiment: str = "fixmatch_digits_40") -> list[str]:
    # The schedule length is pinned so a shorter run and a longer one share the same learning rates.
    config = str(REPO / "experiments" / f"{experiment}.yaml")
    return ["--config", config, f"--data.data_dir={tmp_path}", "--model.schedule_steps=8",
            f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
            *PHASES.get(experiment, [])]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("experiment", STATEFUL)
def test_interrupt_and_resume_equals_uninterrupted(tmp_path: Path, experiment: str) -> None:
    code, full = run_cli(_short(tmp_path, 8, experiment), tmp_path / "full")
    assert code == 0 and full is not None

    interrupt = '[{"class_path": "tests.helpers.InterruptAt", "init_args": {"step": 5}}]'
    with pytest.raises(SystemExit):
        run_cli([*_short(tmp_path, 8, experiment), f"--trainer.callbacks={interrupt}"], tmp_path / "cut")
    saved = next((tmp_path / "cut").rglob("interrupted.ckpt"))
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == 5

    code, resumed = run_cli([*_short(tmp_path, 8, experiment), f"--ckpt_path={saved}"], tmp_path / "resumed")
    assert code == 0 and resumed is not None
    assert read_results(resumed)["global_step"] == 8
    # The evaluation history survives the interruption: steps 2, 4, 6, 8 in both runs.
    assert read_results(resumed)["test_monitor"] == read_results(full)["test_monitor"]
    assert read_results(full)["test_monitor"]["evaluations"] == 4
    _assert_same_weights(
        checkpoint_weights(full.parent / "checkpoints/last.ckpt"),
        checkpoint_weights(resumed.parent / "checkpoints/last.ckpt"),
    )


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, results = run_cli(
        [*_short(tmp_path, 8), "--model.class_path=tests.helpers.FixMatchNaNAt", "--model.nan_at_step=3"],
        tmp_path / "runs",
    )
    err = capsys.readouterr().err
    assert code == 1 and results is None
    assert "became nan at step 3" in err and "last checkpoint" in err
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def _start_training(run_root: Path, data_dir: Path, devices: int, experiment: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    command = [
        sys.executable, "-m", "ssl_lightning", "fit", "--config", str(REPO / "experiments" / f"{experiment}.yaml"),
        f"--run_root={run_root}",
        f"--data.data_dir={data_dir}", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.enable_progress_bar=false", f"--trainer.devices={devices}",
        # SyncBatchNorm refuses CPU modules, and per-rank BatchNorm statistics legitimately depend on the
        # rank count; a BatchNorm-free network isolates what the framework owns: the sharded global
        # batch, rank-independent augmentation seeds, loss normalisation, EMA state and metric sync.
        "--model.backbone=mlp", '--model.backbone_args={"hidden_dims": [64]}',
        "--trainer.strategy=" + ("ddp" if devices > 1 else "auto"),
        *PHASES.get(experiment, []), *DDP_VARIANT.get(experiment, []),
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results_of(process: subprocess.Popen) -> Path:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return Path(stdout.strip().splitlines()[-1])


# FixMatch keeps no state beyond the EMA weights; InfoMatch's run covers everything its run would
# (sharded global batch, augmentation seeds, loss normalisation, EMA, metric sync) plus synced state.
@pytest.mark.ddp
@pytest.mark.parametrize("experiment", [e for e in STATEFUL if e != "fixmatch_digits_40"])
def test_two_process_ddp_equals_one_process_with_same_global_batch(tmp_path: Path, experiment: str) -> None:
    """Same global batch (B=16, mu=3) on 1 process and on 2 gloo processes: same weights, EMA and
    method state (InfoMatch's self-adaptive thresholds are all-reduced over the global batch; SimMatch's
    bank is updated from the all-gathered labeled batch and its DA window from the all-reduced mean)."""
    # Both layouts train at once: most of the cost is interpreter start-up, which then overlaps.
    single_run = _start_training(tmp_path / "single", tmp_path, devices=1, experiment=experiment)
    double_run = _start_training(tmp_path / "double", tmp_path, devices=2, experiment=experiment)
    single, double = _results_of(single_run), _results_of(double_run)
    assert read_results(double)["devices"] == 2
    a = checkpoint_weights(single.parent / "checkpoints/last.ckpt")
    b = checkpoint_weights(double.parent / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # Test metrics are computed over the full test set exactly once on either layout.
    assert read_results(single)["test"]["acc"] == pytest.approx(read_results(double)["test"]["acc"], abs=1e-6)
