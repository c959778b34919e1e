"""The base every method stands on: backbone, optimiser and schedule, EMA weights, evaluation.

A method subclasses :class:`Method`, declares the views it needs, and implements
``compute_losses(batch) -> {"loss": total, <term>: value, ...}``. Everything else (the SGD recipe, the
cosine schedule, EMA evaluation weights, metrics of both the EMA and the raw weights, pseudo-label
diagnostics, the non-finite-loss guard) lives here once.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ssl_lightning.callbacks.throughput import writes_logs_now
from ssl_lightning.components.ema import EMAWeights
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.data.sampling import augmentation_seed
from ssl_lightning.metrics.calibration import ReliabilityBins
from ssl_lightning.metrics.classification import classification_metrics
from ssl_lightning.nets import build_backbone

# The EMA copy is kept in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class NonFiniteLossError(RuntimeError):
    """Raised before the optimiser step when a loss is NaN or infinite, so no weight is corrupted."""


def cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 0, kind: str = "fixmatch",
    milestones: tuple[int, ...] = (), gamma: float = 0.1,
) -> float:
    """The learning-rate factor at ``step`` after an optional linear warm-up.

    ``fixmatch``: ``cos(7πk / 16K)`` (floored at 0). ``half``: ``½(1 + cos(πk'/K'))`` with k' and K'
    counted after the warm-up (MoCo/EMAN-style ImageNet recipes). ``constant``: 1 after the warm-up.
    ``multistep``: ``gamma`` to the number of ``milestones`` (steps) already reached.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "multistep":
        return gamma ** sum(step >= milestone for milestone in milestones)
    if kind == "half":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind != "fixmatch":
        raise ValueError(f"unknown learning-rate schedule {kind!r}: use 'fixmatch', 'half', 'constant' or 'multistep'")
    return max(0.0, math.cos(7.0 * math.pi * step / (16.0 * total_steps)))


def parameter_groups(module: nn.Module, weight_decay: float, exempt_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """Weight decay on weights only: biases and every normalisation layer's parameters are exempt
    (unless ``exempt_norm_and_bias`` is false, as in recipes that decay every parameter).

    Selected by module type, not by parameter name, so norm layers under any name are caught; parameters
    a module lists in timm's ``no_weight_decay()`` (a ViT's ``pos_embed`` and ``cls_token``) are exempt too.
    """
    listed: set[int] = set()
    for submodule in module.modules():
        if callable(getattr(submodule, "no_weight_decay", None)):
            names = set(submodule.no_weight_decay())
            listed |= {id(p) for name, p in submodule.named_parameters() if name in names}
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, parameter in submodule.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            exempt = (isinstance(submodule, _NORM_LAYERS) or name == "bias" or parameter.ndim <= 1
                      or id(parameter) in listed)
            if exempt and exempt_norm_and_bias:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Method(LightningModule):
    """Shared plumbing of all methods.

    Args:
        num_classes, in_channels, image_size: filled in from the DataModule.
        backbone: a registered backbone name (``ssl_lightning.nets.available_backbones()``).
        backbone_args: extra keyword arguments of the backbone constructor.
        lr: base learning rate ``lr_0``.
        optimizer: ``sgd`` (momentum, Nesterov), ``adam`` (coupled L2 weight decay, as torch's Adam) or
            ``adamw`` (decoupled weight decay; small ViTs from scratch).
        momentum, nesterov: SGD settings.
        weight_decay: coupled L2 on weights (not on biases or normalisation layers, see next).
        decay_norm_and_bias: also decay biases and normalisation parameters (some ImageNet recipes).
        schedule_steps: ``K`` of the cosine schedule (``None``: the trainer's ``max_steps``).
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: ``fixmatch`` (cos(7πk/16K)), ``half`` (½(1 + cos πk/K)), ``constant`` or ``multistep``
            (× ``lr_gamma`` at each of ``lr_milestones``, in steps); see :func:`cosine_factor`.
        lr_multipliers: learning-rate factors by parameter-name prefix, e.g. ``{"backbone.head": 10}`` for a
            head trained 10× faster than a pretrained trunk; the longest matching prefix wins.
        ema_decay: decay of the EMA evaluation weights (``None``: evaluate the raw weights only).
        channels_last: use the channels-last memory format (faster convolutions on GPUs).
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = []

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        backbone: str = "wrn28_2",
        backbone_args: dict[str, Any] | None = None,
        lr: float = 0.03,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        decay_norm_and_bias: bool = False,
        schedule_steps: int | None = None,
        warmup_steps: int = 0,
        lr_schedule: Literal["fixmatch", "half", "constant", "multistep"] = "fixmatch",
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        lr_multipliers: dict[str, float] | None = None,
        ema_decay: float | None = 0.999,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.backbone = build_backbone(
            backbone, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            **(backbone_args or {}),
        )
        self.ema = EMAWeights(self.backbone, ema_decay) if ema_decay is not None else None
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.decay_norm_and_bias = decay_norm_and_bias
        self.schedule_steps = schedule_steps
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.lr_multipliers = dict(lr_multipliers or {})
        self.lr_milestones = tuple(lr_milestones or ())
        self.lr_gamma = lr_gamma
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        # Evaluation metrics per stream ("val", "test_monitor" during training; "test" at the end),
        # for the EMA weights and the raw weights.
        self.eval_metrics = nn.ModuleDict()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_reliability = ReliabilityBins(n_bins=15)
        self.confusion_matrix: torch.Tensor | None = None
        self.reliability: dict[str, torch.Tensor] | None = None
        # Every monitored test evaluation (step and metrics of the EMA weights). Checkpointed, so a
        # resumed run still reports last, mean of the last 20 and best over the whole training.
        self.eval_history: list[dict[str, float]] = []

    # ----- what a method implements --------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total}`` plus any named terms to log."""
        raise NotImplementedError

    @property
    def method_name(self) -> str:
        """The name results are filed under (``results.json`` ``method``)."""
        return type(self).__name__.lower()

    @property
    def headline_metric(self) -> str:
        """The evaluation metric summarised over training in ``results.json`` (``test_monitor``)."""
        return "acc"

    @property
    def headline_weights(self) -> str:
        """Which weights the headline numbers come from: ``ema`` (``test``) or ``raw`` (``test_raw``)."""
        return "ema" if self.ema is not None else "raw"

    # ----- forward helpers ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._memory_format(images))

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def forward_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of several view batches from one forward pass (BatchNorm sees them together)."""
        logits = self(torch.cat(views))
        return list(logits.split([v.shape[0] for v in views]))

    def step_generator(self, salt: int = 0) -> torch.Generator:
        """A generator on this module's device seeded by (run seed, global step, salt), alike on all ranks.

        Method-side randomness drawn from it (CutMix boxes, permutations) is a function of the step
        alone: a resumed run draws what an uninterrupted one would have, and every rank draws the same
        values, so a method draws for the global batch and takes its rank's slice.
        """
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = augmentation_seed(run_seed, 1000 + salt, self.global_step)
        return torch.Generator(device=self.device).manual_seed(seed)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def gather_global(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank in rank order (no gradient); itself on one process."""
        if self.world_size == 1:
            return tensor
        return self.all_gather(tensor.detach()).flatten(0, 1)

    # ----- training --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "request_views"):
            datamodule.request_views(self.labeled_views, self.unlabeled_views)

    def training_step(self, batch: dict[str, StreamBatch], batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.global_step} "
                f"(terms: { {k: float(v) for k, v in terms.items()} }). No weight was updated with it; "
                "the last checkpoint saved before this step is intact. Lower --model.lr, check the data, "
                "or train in full precision (--trainer.precision=32-true)."
            )
        # Self-labelled methods train on the unlabeled stream alone.
        batch_size = next(iter(batch.values())).targets.shape[0]
        values = {f"train/{k}": v.detach() for k, v in terms.items()}
        self.log_train({**values, "train/lr": self.optimizers().param_groups[0]["lr"]}, batch_size=batch_size)
        return loss

    def log_train(self, values: dict[str, Any], batch_size: int, **kwargs: Any) -> None:
        """``log_dict`` for per-step training values, on the steps whose values reach the loggers only
        (see :func:`~ssl_lightning.callbacks.throughput.writes_logs_now`): with ~20 values a step, Lightning's
        per-call bookkeeping was a quarter of a digits training step."""
        if writes_logs_now(self._trainer):
            self.log_dict(values, batch_size=batch_size, **kwargs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.backbone)

    def configure_optimizers(self) -> dict[str, Any]:
        # foreach: a few multi-tensor kernels instead of ~5 small ops per parameter. On CPU, where the
        # per-parameter loop is PyTorch's default, this measured 4 ms against 264 ms per WRN-28-2 step.
        groups = self._lr_groups(
            parameter_groups(self, self.weight_decay, exempt_norm_and_bias=not self.decay_norm_and_bias)
        )
        if self.optimizer_name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=self.lr, foreach=True)
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(groups, lr=self.lr, foreach=True)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                        foreach=True)
        total = self.schedule_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("the cosine schedule needs --model.schedule_steps or --trainer.max_steps > 0")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_factor(step, total, self.warmup_steps, self.lr_schedule, self.lr_milestones,
                                       self.lr_gamma),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Split each weight-decay group by ``lr_multipliers`` prefix; every group gets an explicit ``lr``."""
        if not self.lr_multipliers:
            return [{**group, "lr": self.lr} for group in groups]
        names = {id(p): name for name, p in self.named_parameters()}
        unmatched = [prefix for prefix in self.lr_multipliers if not any(n.startswith(prefix) for n in names.values())]
        if unmatched:
            raise ValueError(f"lr_multipliers prefixes {unmatched} match no parameter name (e.g. 'backbone.head')")
        split: list[dict[str, Any]] = []
        for group in groups:
            by_factor: dict[float, list[torch.nn.Parameter]] = {}
            for parameter in group["params"]:
                name = names[id(parameter)]
                matches = [prefix for prefix in self.lr_multipliers if name.startswith(prefix)]
                factor = self.lr_multipliers[max(matches, key=len)] if matches else 1.0
                by_factor.setdefault(factor, []).append(parameter)
            split += [{**group, "params": params, "lr": self.lr * factor} for factor, params in by_factor.items()]
        return split

    # ----- pseudo-label diagnostics ---------------------------------------------------------------
    def log_pseudo_labels(
        self, pseudo_labels: torch.Tensor, mask: torch.Tensor, hidden_targets: torch.Tensor
    ) -> None:
        """Mask rate, accuracy of accepted pseudo-labels against the hidden labels, per-class counts.

        ``mask`` may be soft (weights in [0, 1]); a sample counts as accepted when its weight is > 0.
        The hidden labels are read here and nowhere else.
        """
        with torch.no_grad():
            weights = mask.float()
            accepted = weights > 0
            known = hidden_targets >= 0
            correct = (pseudo_labels == hidden_targets) & known
            stats = {
                "train/mask_rate": weights.mean(),
                "train/pseudo_label_acc": correct.float().sum() / known.sum().clamp(min=1),
                "train/accepted_pseudo_label_acc": (correct & accepted).float().sum()
                / (known & accepted).sum().clamp(min=1),
            }
            counts = torch.bincount(pseudo_labels[accepted], minlength=self.num_classes).float()
            if self.num_classes <= 10:
                stats.update({f"train/pseudo_label_count/{c}": counts[c] for c in range(self.num_classes)})
            stats["train/pseudo_label_class_max_share"] = counts.max() / counts.sum().clamp(min=1)
        self.log_train(stats, batch_size=pseudo_labels.shape[0])

    # ----- evaluation --------------------------------------------------------------------------------
    def _metrics(self, stream: str, weights: str):  # noqa: ANN202
        key = f"{stream}_{weights}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = classification_metrics(self.num_classes).to(self.device)
        return self.eval_metrics[key]

    def _eval_stream_name(self, dataloader_idx: int) -> str:
        names = getattr(self.trainer.datamodule, "eval_streams", ["test"])
        name = names[dataloader_idx]
        return "test_monitor" if name == "test" else name

    def _evaluate(self, batch: StreamBatch, stream: str) -> None:
        images, targets = batch.views[0], batch.targets
        raw_logits = self.backbone(self._memory_format(images)).float()
        self._metrics(stream, "raw").update(raw_logits, targets)
        if self.ema is not None:
            ema_logits = self.ema(self._memory_format(images)).float()
            self._metrics(stream, "ema").update(ema_logits, targets)
        else:
            ema_logits = raw_logits
        if stream == "test":
            self.test_confusion.update(ema_logits.argmax(dim=1), targets)
            self.test_reliability.update(ema_logits, targets)

    def _log_stream(self, stream: str) -> None:
        for weights in ("ema", "raw"):
            key = f"{stream}_{weights}"
            if key not in self.eval_metrics:
                continue
            # Without EMA weights the raw weights are what the stream reports under its plain name.
            prefix = f"{stream}_raw" if weights == "raw" and self.ema is not None else stream
            values = self.eval_metrics[key].compute()
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
            self.eval_metrics[key].reset()
            if stream == "test_monitor" and prefix == stream and not self.trainer.sanity_checking:
                self.eval_history.append({"step": self.global_step, **{k: float(v) for k, v in values.items()}})

    def validation_step(self, batch: StreamBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, self._eval_stream_name(dataloader_idx))

    def on_validation_epoch_end(self) -> None:
        for stream in ("val", "test_monitor"):
            self._log_stream(stream)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["eval_history"] = list(self.eval_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.eval_history = list(checkpoint.get("eval_history", []))

    def test_step(self, batch: StreamBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_stream("test")
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        self.reliability = {k: v.cpu() for k, v in self.test_reliability.compute().items()}
        self.test_reliability.reset()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy computed in float32 from log-softmax (stable under bf16 autocast)."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)
