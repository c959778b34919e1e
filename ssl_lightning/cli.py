"""Command line: ``python -m ssl_lightning fit --config experiments/<EXP>.yaml [overrides]``.

A LightningCLI whose arguments come from the class signatures of the method, the DataModule and the
Trainer, so an unknown or mistyped key fails before anything trains. On top of Lightning it gives every
run its own directory ``runs/<experiment>/<timestamp>-<seed>/`` (resolved config, checkpoints, logs,
``results.json``), tests the last weights (EMA and raw) after training, and prints the path of
``results.json`` as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from ssl_lightning.callbacks.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    RunCheckpoints,
    check_checkpoint,
)
from ssl_lightning.callbacks.figures import CAMOverlayFigure, ConfusionMatrixFigure, ReliabilityDiagramFigure
from ssl_lightning.callbacks.throughput import TrainThroughput
from ssl_lightning.data.formats import DatasetNotFoundError
from ssl_lightning.data.module import SSLDataModule
from ssl_lightning.data.splits import SplitFileError
from ssl_lightning.methods.base import Method, NonFiniteLossError
from ssl_lightning.nets.pretrained import PretrainedWeightsError, check_pretrained_path

RUN_DIR_ENV = "SSL_LIGHTNING_RUN_DIR"

TRAINER_DEFAULTS: dict[str, Any] = {
    # Training is measured in optimiser steps over endless streams, never in epochs.
    "max_epochs": -1,
    "check_val_every_n_epoch": None,
    # Our samplers shard the global batch and the evaluation sets themselves (no padded duplicates).
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
}


# Overrides that say where and how a run executes, not what it trains: they are not part of its variant.
BOOKKEEPING_KEYS = (
    "seed_everything", "run_root", "experiment", "wandb_project", "data.data_dir", "data.num_workers",
    "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
    "trainer.strategy",
)


def experiment_overrides(argv: list[str]) -> list[str]:
    """The command-line overrides that change what a run trains (``--model.lambda_u=2``), in ``--key=value``
    form: ``argv`` without the subcommand, the ``--config`` files and the :data:`BOOKKEEPING_KEYS`."""
    overrides: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("--"):
            continue  # the subcommand
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            value = next(tokens, "")
        if key != "config" and key not in BOOKKEEPING_KEYS:
            overrides.append(f"--{key}={value}")
    return overrides


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _new_run_dir(run_root: str, experiment: str, seed: int) -> Path:
    base = Path(run_root) / experiment
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base / f"{stamp}-{seed}", 1
    while candidate.exists():  # two runs started in the same second never share a directory
        candidate, n = base / f"{stamp}-{seed}.{n}", n + 1
    return candidate


class SSLCLI(LightningCLI):
    """LightningCLI with the project's run directory, loggers, callbacks and results contract."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        self.results_path: Path | None = None
        self._fit_started = 0.0
        self.overrides = experiment_overrides(sys.argv[1:] if args is None else list(args))
        super().__init__(
            model_class=Method,
            datamodule_class=SSLDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="adhoc", help="name of the experiment (run folder)")
        parser.add_argument("--run_root", type=str, default="runs", help="where run directories are created")
        parser.add_argument("--wandb_project", type=str, default="ssl_lightning", help="W&B project")
        for key in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    # ----- run directory, loggers, callbacks --------------------------------------------------------
    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        # Checked here, before any run directory exists; inside the model's constructor the message would
        # drown in the argument parser's report.
        check_pretrained_path(config.model.init_args.get("backbone_args"))
        feature_weights = config.data.init_args.get("feature_weights")
        if feature_weights is not None and not Path(feature_weights).expanduser().is_file():
            raise PretrainedWeightsError(
                f"feature extractor weights not found: {feature_weights}. They load from a local file only "
                "(torchvision's ResNet-50 IMAGENET1K_V1 file, resnet50-0676ba61.pth): put it there or pass "
                "--data.feature_weights=<path>."
            )
        # DDP children (started by Lightning with LOCAL_RANK set) re-run this command; they inherit the
        # directory rank 0 chose instead of making their own.
        is_child = os.environ.get("LOCAL_RANK", "0") != "0"
        run_dir = os.environ.get(RUN_DIR_ENV) if is_child else None
        if run_dir is None:
            run_dir = str(_new_run_dir(config.run_root, config.experiment, config.seed_everything))
            os.environ[RUN_DIR_ENV] = run_dir
        self.run_dir = Path(run_dir)
        config.trainer.default_root_dir = run_dir

    def _loggers(self) -> list[Logger]:
        assert self.run_dir is not None
        loggers: list[Logger] = [CSVLogger(save_dir=str(self.run_dir), name="logs", version="")]
        # W&B is the default logger, offline unless the environment says otherwise; a run started by a sweep
        # agent reports to its sweep, so it defaults to online.
        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_SWEEP_ID") else "offline")
        if os.environ["WANDB_MODE"] != "disabled":
            try:
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(
                    WandbLogger(
                        project=self._subconfig().wandb_project, name=self.run_dir.name,
                        group=self._subconfig().experiment, save_dir=str(self.run_dir),
                    )
                )
            except (ImportError, ModuleNotFoundError) as error:
                print(f"W&B logging is off ({error}); the CSV log is still written.", file=sys.stderr)
        return loggers

    def _callbacks(self, has_val_split: bool, metric: str) -> list[Callback]:
        assert self.run_dir is not None
        checkpoint_dir = str(self.run_dir / "checkpoints")
        callbacks: list[Callback] = [
            RunCheckpoints(checkpoint_dir),
            TrainThroughput(),
            ConfusionMatrixFigure(),
            ReliabilityDiagramFigure(),
            CAMOverlayFigure(),
            LearningRateMonitor(logging_interval="step"),
        ]
        if has_val_split:
            # "Best" exists only when selected on a validation split carved from the training data.
            callbacks.append(
                ModelCheckpoint(dirpath=checkpoint_dir, filename=f"best-val-{metric}", monitor=f"val/{metric}", mode="max",
                                save_top_k=1, save_on_train_epoch_end=False)
            )
        return callbacks

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        datamodule = self.datamodule
        # Checkpoints are ours (RunCheckpoints, and a best-val ModelCheckpoint when there is a val split):
        # without one, Lightning would add its default ModelCheckpoint, a second copy of last.ckpt in logs/.
        checkpointing = config.get("enable_checkpointing") is not False
        has_val = checkpointing and "val" in getattr(datamodule, "eval_streams", [])
        config["enable_checkpointing"] = has_val
        callbacks = list(callbacks) + self._callbacks(has_val, getattr(self.model, "headline_metric", "acc"))
        if config.get("logger") in (None, True):
            config["logger"] = self._loggers()
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters while parsing; refuse a bad file first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    # ----- fit hooks -----------------------------------------------------------------------------------
    def before_fit(self) -> None:
        if self.trainer.is_global_zero and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, self.run_dir / "config.yaml", skip_none=False, overwrite=True,
                             multifile=False)
        self._fit_started = time.time()

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        assert self.run_dir is not None
        wall_time = time.time() - self._fit_started
        if not trainer.fast_dev_run:  # a smoke test leaves no checkpoint behind, as Lightning's own callbacks do
            trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt")
        trainer.test(model, datamodule=datamodule, verbose=False)
        if trainer.is_global_zero:
            self.results_path = self._write_results(wall_time)
        # Close the W&B run now, so its closing messages come before the results path.
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.finish()
        if trainer.is_global_zero:
            print(self.results_path)

    def _write_results(self, wall_time: float) -> Path:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        test = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")}
        test_raw = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test_raw/")} or dict(test)
        throughput = next((c for c in trainer.callbacks if isinstance(c, TrainThroughput)), None)
        split = getattr(datamodule, "split", None)
        spec = getattr(datamodule, "split_spec", None)
        results = {
            "experiment": self._subconfig().experiment,
            "method": model.method_name,
            "dataset": getattr(datamodule, "dataset_key", type(datamodule).__name__),
            "num_labels": None if split is None else int(len(split.labeled_indices)),
            "seed": self._subconfig().seed_everything,
            "overrides": self.overrides,
            "split_sha256": None if split is None else split.sha256,
            "git_commit": git_commit(),
            "global_step": trainer.global_step,
            "wall_time_s": round(wall_time, 2),
            "train_images_per_s": None if throughput is None else throughput.average(),
            "test": test,
            "test_raw": test_raw,
            "headline_weights": model.headline_weights,
            "test_monitor": summarize_history(getattr(model, "eval_history", []),
                                              metric=getattr(model, "headline_metric", "acc")),
            "label_protocol": None if spec is None else {
                k: v for k, v in vars(spec).items() if k != "fixed_indices"
            },
            "devices": trainer.world_size,
            "precision": str(trainer.precision),
            "ckpt_path": None if trainer.fast_dev_run or self.run_dir is None
            else str(self.run_dir / "checkpoints" / "last.ckpt"),
        }
        # Files a run derived from its data and reuses (feature caches, drawn soft labels), by content hash.
        for key in ("feature_cache_sha256", "soft_labels_sha256", "soft_label_argmax_accuracy"):
            if getattr(datamodule, key, None) is not None:
                results[key] = getattr(datamodule, key)
        path = self.run_dir / "results.json"
        path.write_text(json.dumps(results, indent=2))
        return path


def summarize_history(history: list[dict[str, float]], window: int = 20, metric: str = "acc") -> dict[str, Any]:
    """Last, mean of the last ``window`` and best of a test metric monitored during training.

    The best is selected on the test set: it is optimistic and only comparable with published tables
    that report the same; the name says so.
    """
    if not history:
        return {"evaluations": 0}
    values = [entry[metric] for entry in history]
    best = max(history, key=lambda entry: entry[metric])
    return {
        "evaluations": len(history),
        f"last_{metric}": values[-1],
        f"mean_last_{window}_{metric}": sum(values[-window:]) / len(values[-window:]),
        f"best_{metric}_test_selected_optimistic": best[metric],
        "best_step_test_selected_optimistic": best["step"],
    }


USER_ERRORS = (NonFiniteLossError, DatasetNotFoundError, SplitFileError, CheckpointError, PretrainedWeightsError)


def train(experiment: str, *overrides: str, run_root: str | Path = "runs") -> Path:
    """Train ``experiments/<experiment>.yaml`` in this process (notebooks, scripts) with LightningCLI
    overrides such as ``"--trainer.max_steps=50"``; return the path of its ``results.json``."""
    from ssl_lightning.runs import REPO_ROOT

    config = REPO_ROOT / "experiments" / f"{experiment}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"unknown experiment '{experiment}': {config} does not exist (`make experiments`)")
    torch.set_float32_matmul_precision("high")
    # The arguments are the ones given here: a Jupyter kernel's own command line (-f <connection file>) is not
    # ours, and LightningCLI would warn that it ignores it.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = SSLCLI(args=["fit", "--config", str(config), f"--run_root={run_root}", *overrides])
    finally:
        sys.argv = argv
    if cli.results_path is None:
        raise RuntimeError(f"'{experiment}' wrote no results.json")
    return cli.results_path


def main(args: list[str] | None = None) -> int:
    torch.set_float32_matmul_precision("high")
    try:
        SSLCLI(args=args)
    except USER_ERRORS as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    return 0
