"""The command-line contract: configs, run directories, results.json, and clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from ssl_lightning.cli import BOOKKEEPING_KEYS, SSLCLI, experiment_overrides
from tests.helpers import (
    EXPERIMENTS,
    REPO,
    SMOKE_EXPERIMENTS,
    experiment_config,
    read_results,
    run_cli,
    tiny_overrides,
)

RESULT_KEYS = {
    "experiment", "method", "dataset", "num_labels", "seed", "split_sha256", "git_commit", "global_step",
    "wall_time_s", "train_images_per_s", "test", "test_raw", "overrides",
}


def test_results_record_the_overrides_that_change_what_is_trained() -> None:
    argv = ["fit", "--config", "experiments/x.yaml", "--model.lambda_u=2", "--seed_everything", "3",
            "--trainer.max_steps", "10", "--data.data_dir=/tmp/data", "--trainer.enable_progress_bar=false",
            "--model.lr_multipliers={'backbone.head': 10.0}"]
    assert experiment_overrides(argv) == [
        "--model.lambda_u=2", "--trainer.max_steps=10", "--model.lr_multipliers={'backbone.head': 10.0}"]


def test_every_experiment_has_a_fast_dev_run_representative() -> None:
    covered = sorted(name for members in SMOKE_EXPERIMENTS.values() for name in members)
    assert covered == EXPERIMENTS
    # A group shares method, DataModule and backbone (the smoke test sets its own label count).
    assert SMOKE_EXPERIMENTS["fixmatch_cifar100_10000"] == [
        "fixmatch_cifar100_10000", "fixmatch_cifar100_2500", "fixmatch_cifar100_400"]
    assert len(SMOKE_EXPERIMENTS["collision_digits"]) == 1  # an unsupervised config is its own group
    # Unsupervised and weakly supervised clustering run different streams: separate groups.
    assert "collision_cifar10_vgg4_2500" not in SMOKE_EXPERIMENTS["collision_cifar10_vgg4"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_instantiates(name: str, fixture_data: Path) -> None:
    """Every config (not only the fast_dev_run representatives) parses with no unknown key and builds its
    model, DataModule and Trainer."""
    cli = SSLCLI(args=["--config", str(REPO / "experiments" / f"{name}.yaml"), *tiny_overrides(name, fixture_data)],
                 run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("name", sorted(SMOKE_EXPERIMENTS))
def test_fast_dev_run_every_experiment(name: str, fixture_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """One step of training, evaluation and test, one per group of configs with the same method, DataModule,
    backbone and labeled-or-not (see ``SMOKE_EXPERIMENTS``)."""
    code, results = run_cli(
        ["--config", str(REPO / "experiments" / f"{name}.yaml"), "--trainer.fast_dev_run=1",
         *tiny_overrides(name, fixture_data)],
        tmp_path,
    )
    assert code == 0 and results is not None
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(results)
    payload = read_results(results)
    assert payload.keys() >= RESULT_KEYS
    assert payload["experiment"] == name and payload["global_step"] == 1
    assert payload["overrides"] == ["--trainer.fast_dev_run=1", *(
        o for o in tiny_overrides(name, fixture_data) if o.split("=", 1)[0][2:] not in BOOKKEEPING_KEYS)]
    assert 0.0 <= payload["test"]["acc"] <= 1.0 and "acc" in payload["test_raw"]
    assert results.parent.parent.name == name and results.parent.name.endswith(f"-{payload['seed']}")
    assert (results.parent / "config.yaml").is_file()


def test_unknown_key_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(["--config", str(REPO / "experiments/fixmatch_digits_40.yaml"), "--model.lamda_u=2"], tmp_path)
    assert info.value.code != 0
    assert "lamda_u" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unknown_key_in_yaml_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = (REPO / "experiments/fixmatch_digits_40.yaml").read_text().replace("threshold:", "treshold:")
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    with pytest.raises(SystemExit):
        run_cli(["--config", str(path)], tmp_path)
    assert "treshold" in capsys.readouterr().err


def test_simmatch_bank_size_is_derived_never_configured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """T-CFG: K comes from the labeled subset; a configured K is an unknown key, not a silently dead one."""
    with pytest.raises(SystemExit):
        run_cli(["--config", str(REPO / "experiments/simmatch_digits_40.yaml"), "--model.K=40"], tmp_path)
    assert "K" in capsys.readouterr().err


def test_unknown_experiment_lists_available() -> None:
    out = subprocess.run(["make", "-s", "train", "EXP=no_such_experiment"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "Unknown experiment 'no_such_experiment'" in out.stdout and "fixmatch_digits_40" in out.stdout


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_data_here"
    code, results = run_cli(
        ["--config", str(REPO / "experiments/fixmatch_cifar10_40.yaml"), "--trainer.fast_dev_run=1",
         "--trainer.accelerator=cpu", f"--data.data_dir={missing}", "--data.num_workers=0"],
        tmp_path,
    )
    err = capsys.readouterr().err
    assert code == 1 and results is None
    assert str(missing) in err and "--data.download=true" in err


def test_corrupt_checkpoint_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    code, results = run_cli(
        ["--config", str(REPO / "experiments/fixmatch_digits_40.yaml"), f"--data.data_dir={tmp_path}",
         f"--ckpt_path={corrupt}"],
        tmp_path / "runs",
    )
    assert code == 1 and results is None
    assert "could not be read" in capsys.readouterr().err
    assert corrupt.read_bytes() == b"this is not a checkpoint"


def test_bf16_mixed_precision_by_trainer_config_alone(tmp_path: Path) -> None:
    code, results = run_cli(
        ["--config", str(REPO / "experiments/fixmatch_digits_40.yaml"), "--trainer.fast_dev_run=2",
         "--trainer.precision=bf16-mixed", f"--data.data_dir={tmp_path}"],
        tmp_path,
    )
    assert code == 0 and results is not None
    payload = read_results(results)
    assert payload["precision"] == "bf16-mixed" and payload["test"]["nll"] == payload["test"]["nll"]


def test_without_ema_the_raw_weights_are_reported(tmp_path: Path) -> None:
    code, results = run_cli(
        ["--config", str(REPO / "experiments/supervised_digits_40.yaml"), "--trainer.fast_dev_run=1",
         "--model.ema_decay=null", f"--data.data_dir={tmp_path}"],
        tmp_path,
    )
    assert code == 0 and results is not None
    payload = read_results(results)
    assert payload["test"] == payload["test_raw"] and "acc" in payload["test"]


def test_default_wandb_logger_runs_offline_and_results_path_is_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The default logger as a user meets it: W&B offline, files in the run directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    code, results = run_cli(
        ["--config", str(REPO / "experiments/supervised_digits_40.yaml"), "--trainer.max_steps=2",
         "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", f"--data.data_dir={tmp_path}"],
        tmp_path,
    )
    assert code == 0 and results is not None
    assert list((results.parent / "wandb").glob("offline-run-*"))
    assert capfd.readouterr().out.strip().splitlines()[-1] == str(results)
    # The test figures of the EMA weights sit next to results.json.
    assert (results.parent / "confusion_matrix.png").stat().st_size > 0
    assert (results.parent / "reliability_diagram.png").stat().st_size > 0
    # One checkpoint, ours: Lightning's default ModelCheckpoint would add a copy under logs/.
    assert [p.relative_to(results.parent) for p in results.parent.rglob("*.ckpt")] == [Path("checkpoints/last.ckpt")]


def test_a_validation_split_adds_the_best_val_checkpoint(tmp_path: Path) -> None:
    code, results = run_cli(
        ["--config", str(REPO / "experiments/supervised_digits_40.yaml"), "--trainer.max_steps=4",
         "--trainer.val_check_interval=2", "--data.val_size=50", "--trainer.enable_progress_bar=false",
         f"--data.data_dir={tmp_path}"],
        tmp_path,
    )
    assert code == 0 and results is not None
    checkpoints = sorted(str(p.relative_to(results.parent)) for p in results.parent.rglob("*.ckpt"))
    assert checkpoints == ["checkpoints/best-val-acc.ckpt", "checkpoints/last.ckpt"]


def _vit_configs() -> dict[str, str]:
    """One config per distinct pretrained ViT architecture among the experiments."""
    seen: dict[str, str] = {}
    for name in EXPERIMENTS:
        init = experiment_config(name)["model"]["init_args"]
        args = init.get("backbone_args") or {}
        if "pretrained_path" in args and init["backbone"].startswith("vit"):
            seen.setdefault(json.dumps([init["backbone"], args.get("patch_size")]), name)
    return seen


@pytest.mark.parametrize("experiment", sorted(_vit_configs().values()))
def test_pretrained_vit_configs_load_their_architecture_from_a_local_file(experiment: str, tmp_path: Path) -> None:
    """The full-size backbone of each pretrained-ViT config builds from a timm-format file wrapped and
    prefixed as USB ships them (``{"model": ...}``, ``module.``), with its head left out."""
    from ssl_lightning.nets import build_backbone

    config = experiment_config(experiment)
    init, data = config["model"]["init_args"], config["data"]["init_args"]
    image_size = 96 if "STL10" in config["data"]["class_path"] else 32
    args = {k: v for k, v in init["backbone_args"].items() if k != "pretrained_path"}
    source = build_backbone(init["backbone"], num_classes=10, image_size=image_size, **args)
    state = {f"module.{k}": v for k, v in source.encoder.state_dict().items()}
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)
    loaded = build_backbone(init["backbone"], num_classes=10, image_size=image_size, pretrained_path=str(path), **args)
    assert torch.equal(loaded.encoder.pos_embed, source.encoder.pos_embed)
    assert data.get("normalization") == "imagenet"


def test_missing_pretrained_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, results = run_cli(["--config", str(REPO / "experiments/uwbssl_cifar10_250.yaml"),
                             f"--data.data_dir={tmp_path}"], tmp_path / "runs")
    assert code == 1 and results is None
    assert "pretrained weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_training_values_are_written_at_every_logging_step(tmp_path: Path) -> None:
    """Per-step values are only handed to Lightning on the steps it writes (its per-call bookkeeping is slow);
    every written step must still carry all of them."""
    from ssl_lightning.runs import read_metrics

    code, results = run_cli(
        ["--config", str(REPO / "experiments/fixmatch_digits_40.yaml"), "--trainer.max_steps=9",
         "--trainer.log_every_n_steps=3", "--trainer.enable_progress_bar=false", f"--data.data_dir={tmp_path}"],
        tmp_path,
    )
    assert code == 0 and results is not None
    metrics = read_metrics(results.parent)
    for name in ("train/loss", "train/lr", "train/mask_rate", "train/pseudo_label_count/0"):
        assert metrics[name].steps.tolist() == [2, 5, 8], name
    assert metrics["train/images_per_s"].steps.tolist() == [8]  # after its 5 warm-up steps
