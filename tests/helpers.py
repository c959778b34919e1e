"""Running the CLI in-process from tests, with configs shrunk to the generated datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from ssl_lightning.cli import main
from ssl_lightning.methods import FixMatch

REPO = Path(__file__).resolve().parent.parent
GATE_SEEDS = [0, 1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def _smoke_signature(name: str) -> str:
    """What a one-step run of an experiment exercises: its method, DataModule and backbone, and whether it
    has a labeled stream. Configs that differ in anything else (numbers, loss or gate options) share one
    ``fast_dev_run``; each is still parsed and instantiated on its own (test_every_config_instantiates), and
    the options' code paths are unit-tested with their methods."""
    config = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    model, data = config["model"], config["data"]
    labels = data.get("init_args", {}).get("num_labels")
    return json.dumps([model["class_path"], data["class_path"], model.get("init_args", {}).get("backbone"),
                       labels if labels in (0, None) else "some"])


def _one_per_signature(names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_smoke_signature(name), []).append(name)
    return {members[0]: members for members in groups.values()}


# fast_dev_run representatives: each stands for the configs listed with it.
SMOKE_EXPERIMENTS = _one_per_signature(EXPERIMENTS)

# Labels that fit the generated datasets (a few images per class), per DataModule.
_TINY_LABELS = {"CIFAR100DataModule": 100, "ImageNetDataModule": 3}


def experiment_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())


def tiny_overrides(name: str, data_root: Path) -> list[str]:
    """Overrides that keep an experiment's method and backbone but fit it to the generated files."""
    config = experiment_config(name)
    data_class = config["data"]["class_path"].rsplit(".", 1)[1]
    data_args = config["data"]["init_args"]
    # One CPU process: no DDP, and no SyncBatchNorm (it refuses CPU modules).
    overrides = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                 "--trainer.sync_batchnorm=false", "--trainer.precision=32-true", "--data.num_workers=0"]
    overrides += _without_pretrained_files(config["model"]["init_args"])
    if data_class == "DigitsDataModule":
        return [*overrides, f"--data.data_dir={data_root}"]
    overrides += _DATA_OVERRIDES.get(data_class, [])
    if data_class == "FixedFeatureDataModule":
        # The feature cache lives with the generated data, never in the repository's cache/.
        overrides.append(f"--data.cache_dir={data_root / 'feature_cache'}")
    labels = data_args.get("num_labels")
    if data_args.get("imbalance_ratio") is not None:
        overrides.append("--data.max_per_class=8")  # a long tail that fits a few images per class
    if labels:  # 0 (unsupervised) and None (every image labeled) fit any dataset as they are
        overrides.append(f"--data.num_labels={_TINY_LABELS.get(data_class, 20)}")
    if data_class == "ImageNetDataModule":
        overrides += [f"--data.data_dir={data_root / 'imagenet'}", "--data.num_classes=3"]
    else:  # split files (and the Gaussian mixture's) go next to the generated data
        overrides.append(f"--data.data_dir={data_root}")
    # CUB's 224 px crops are fixed by its protocol: one image per batch keeps a ResNet-50/VGG16 step cheap.
    batch, eval_batch = (1, 1) if data_class.startswith("CUB") else (2, 4)
    return [*overrides, f"--data.batch_size={batch}", "--data.mu=1", f"--data.eval_batch_size={eval_batch}"]


# Per DataModule: shrink what the generated files do not already make small. Fixed features: a random-init
# narrow CNN at 16 px stands in for the ImageNet ResNet-50 file the tests cannot ship.
_DATA_OVERRIDES: dict[str, list[str]] = {
    "FixedFeatureDataModule": ["--data.feature_weights=null", "--data.feature_random_init=true",
                               "--data.feature_backbone=small_cnn",
                               '--data.feature_backbone_args={"widths": [8, 16]}',
                               "--data.feature_image_size=16"],
    "GaussianMixtureMIDataModule": ["--data.count_scale=0.001"],  # 10-25 training samples per class
    "DigitsLocDataModule": ["--data.train_renders=1", "--data.eval_renders=1"],
}


def _without_pretrained_files(model_args: dict[str, Any]) -> list[str]:
    """Drop the pretrained-weights file a config names (the tests cannot ship it): a ViT becomes a one-block
    ViT with the same patch layout, any other backbone keeps its architecture with a random init. This keeps
    a smoke test of the pipeline; tests/nets load the real architectures from files."""
    backbone_args = model_args.get("backbone_args") or {}
    if "pretrained_path" not in backbone_args:
        return []
    tiny = {k: v for k, v in backbone_args.items() if k != "pretrained_path"}
    if model_args.get("backbone", "").startswith("vit"):
        tiny |= {"embed_dim": 48, "depth": 1, "num_heads": 2}
    return [f"--model.backbone_args={json.dumps(tiny)}"]


def run_cli(args: list[str], run_root: Path) -> tuple[int, Path | None]:
    """Run ``fit`` in-process; return the exit code and the results.json path (if one was written)."""
    code = main(["fit", *args, f"--run_root={run_root}"])
    found = sorted(run_root.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return code, (found[-1] if found else None)


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class FixMatchNaNAt(FixMatch):
    """FixMatch whose loss turns NaN from ``nan_at_step`` on (to test the non-finite-loss guard)."""

    def __init__(self, nan_at_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        terms = super().compute_losses(batch)
        if self.global_step >= self.nan_at_step:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def capture_backbone_logits(model: LightningModule, monkeypatch: Any) -> dict[str, torch.Tensor]:
    """Wrap ``model.backbone.forward_with_features`` so the logits of its last call keep their gradient;
    returns the dict that will hold them under ``"logits"``."""
    captured: dict[str, torch.Tensor] = {}
    original = model.backbone.forward_with_features

    def capture(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = original(images)
        logits.retain_grad()
        captured["logits"] = logits
        return logits, features

    monkeypatch.setattr(model.backbone, "forward_with_features", capture)
    return captured


class InterruptAt(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) when training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def train_digits(experiment: str, seeds: list[int], tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    """Train a digits experiment as configured (only paths and the progress bar changed), per seed."""
    results = []
    for seed in seeds:
        code, path = run_cli(
            ["--config", str(REPO / "experiments" / f"{experiment}.yaml"), f"--seed_everything={seed}",
             f"--data.data_dir={tmp_path}", "--trainer.enable_progress_bar=false", *extra],
            tmp_path / f"{experiment}-{seed}",
        )
        assert code == 0 and path is not None
        results.append(read_results(path))
    return results


def shared_digits_run(experiment: str, seed: int, root: Path) -> dict[str, Any]:
    """:func:`train_digits` for one seed, trained once under ``root`` by whichever process asks first;
    the others wait on its lock and read its results."""
    from filelock import FileLock

    cached = root / f"{experiment}-{seed}.json"
    with FileLock(str(cached) + ".lock"):
        if not cached.exists():
            (result,) = train_digits(experiment, [seed], root / "runs")
            cached.write_text(json.dumps(result))
    return json.loads(cached.read_text())


def train_log(result: dict[str, Any]) -> dict[str, list[float]]:
    """Every logged value of each ``train/`` metric of a run, in step order, from its CSV log."""
    import csv

    run_dir = Path(result["ckpt_path"]).parent.parent
    columns: dict[str, list[float]] = {}
    with next(run_dir.rglob("metrics.csv")).open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("train/") and value not in ("", None):
                    columns.setdefault(key.removeprefix("train/"), []).append(float(value))
    return columns


def mean_test_acc(results: list[dict[str, Any]]) -> float:
    return sum(r["test"]["acc"] for r in results) / len(results)
