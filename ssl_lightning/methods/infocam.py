"""PC-softmax and infoCAM (Qin, Kim & Gedeon, arXiv 1911.10688): a classifier that estimates mutual
information, and class activation maps built from differences of class evidence.

Training is supervised, with exactly one loss (spec §3.1):

    ce          L = −(1/B) Σ_i log σ_{y_i}(f(x_i))
    pc_softmax  L = −(1/B) Σ_i log s̃_{y_i}(x_i),   log s̃_y = f_y − LSE(f + π),   π = log p (training prior)

Evaluation (no gradient, fp32) reports, per eval split, accuracy, mean-per-class accuracy and the MI
estimates Î_PC, Î_bal, Î_BA; on localisation DataModules (those with ``eval_boxes``) also every map
variant {cam, mean_others (infoCAM), least_likely} × {k = 1, k = ``region_k``} scored as GT-known Loc,
Top-1 Loc and Top-5 Loc. The box threshold τ is 0.2 unless selected on the validation split: after
each validation pass the τ with the best GT-known Loc per variant is kept, and the final test reports
``{variant}/top1_loc_val_tau`` at that τ. Maximum-over-τ numbers on test are logged as ``*_oracle``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.pc_softmax import pc_softmax_loss, prior_from_counts
from ssl_lightning.methods.base import Method, cross_entropy
from ssl_lightning.metrics.localization import (
    MAP_VARIANTS,
    TAU_SWEEP,
    ClassBalanceMetrics,
    LocalizationMetrics,
    activation_maps,
    extract_boxes,
    localization_ious,
    region_sum,
    topk_correct,
    upsample_normalize,
    variant_key,
)

HEADLINE_TAU = 0.2


class PriorMismatchError(RuntimeError):
    """The training split's class prior differs from the one saved in the checkpoint being resumed."""


class InfoCAM(Method):
    """Softmax or PC-softmax classifier with infoCAM localisation (see the module docstring).

    Args:
        loss: ``ce`` or ``pc_softmax``.
        prior: ``empirical`` (training-split proportions) or ``uniform`` (PC-softmax then equals CE − log K).
        region_k: region-sum kernel of the dataset (CUB 4, Tiny ImageNet 3, digits 3); k = 1 is always
            evaluated too.
        region_padding: ``full`` (the reference's (h+k−1)² output) or ``same``.
        box_mode: ``largest`` 8-connected component or ``all_foreground``.
        iou_convention: ``continuous`` or ``inclusive_pixels`` (only for comparisons with the reference).
        posthoc_logit_adjust: predict argmax(f − π) (a CE-baseline option).
        box_threads: threads of the box search.
        overlay_images: test images whose maps the overlay figure shows.
        **kwargs: the shared :class:`~ssl_lightning.methods.base.Method` arguments (EMA off by default).
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = []

    def __init__(
        self,
        loss: Literal["ce", "pc_softmax"] = "ce",
        prior: Literal["empirical", "uniform"] = "empirical",
        region_k: int = 1,
        region_padding: Literal["full", "same"] = "full",
        box_mode: Literal["largest", "all_foreground"] = "largest",
        iou_convention: Literal["continuous", "inclusive_pixels"] = "continuous",
        posthoc_logit_adjust: bool = False,
        box_threads: int = 1,
        overlay_images: int = 16,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(ema_decay=ema_decay, **kwargs)
        self.loss_name = loss
        self.prior_kind = prior
        self.region_ks = (1,) if region_k == 1 else (1, region_k)
        self.region_padding = region_padding
        self.box_mode = box_mode
        self.iou_convention = iou_convention
        self.posthoc_logit_adjust = posthoc_logit_adjust
        self.box_threads = box_threads
        self.overlay_images = overlay_images
        self.variants = [variant_key(v, k) for v in MAP_VARIANTS for k in self.region_ks]
        # log p of the training split: fixed, global, saved with the checkpoint (spec §4).
        self.register_buffer("log_prior", torch.zeros(self.num_classes))
        self.selected_thresholds: dict[str, float] = {}
        self.overlays: dict[str, torch.Tensor] | None = None
        self._boxes: dict[str, torch.Tensor] = {}

    @property
    def method_name(self) -> str:
        return "pcsoftmax" if self.loss_name == "pc_softmax" else "infocam"

    @property
    def localizes(self) -> bool:
        datamodule = self._datamodule()
        return datamodule is not None and hasattr(datamodule, "eval_boxes")

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    # ----- setup and the prior -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "class_counts"):
            raise ValueError("InfoCAM needs a DataModule with class_counts() (the training split's label counts)")
        self.log_prior = prior_from_counts(datamodule.class_counts(), self.prior_kind).to(self.device)
        if self.localizes:
            self._boxes = {stream: datamodule.eval_boxes(stream) for stream in datamodule.eval_streams}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("state_dict", {}).get("log_prior")
        if saved is not None and self._datamodule() is not None:
            difference = float((saved.cpu() - self.log_prior.cpu()).abs().max())
            if difference > 1e-6:
                raise PriorMismatchError(
                    f"the checkpoint's class prior differs from this run's training split (max |Δ log p| = "
                    f"{difference:.2e}): resume with the data settings the checkpoint was trained with"
                )
        self.selected_thresholds = dict(checkpoint.get("selected_thresholds", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["selected_thresholds"] = dict(self.selected_thresholds)

    # ----- training -------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled = batch["labeled"]
        logits = self(labeled.views[0])
        if self.loss_name == "pc_softmax":
            return {"loss": pc_softmax_loss(logits, labeled.targets, self.log_prior)}
        return {"loss": cross_entropy(logits, labeled.targets)}

    # ----- evaluation -----------------------------------------------------------------------------
    def _class_metrics(self, stream: str) -> ClassBalanceMetrics:
        key = f"{stream}_classes"
        if key not in self.eval_metrics:
            minority = getattr(self._datamodule(), "minority_classes", None) or ()
            self.eval_metrics[key] = ClassBalanceMetrics(self.log_prior, self.loss_name, minority).to(self.device)
        return self.eval_metrics[key]  # type: ignore[return-value]

    def _thresholds(self, stream: str) -> tuple[float, ...]:
        # The sweep costs 20× the box search: on the validation split (to select τ) and the final test.
        return TAU_SWEEP if stream in ("val", "test") else (HEADLINE_TAU,)

    def _localization_metrics(self, stream: str) -> LocalizationMetrics:
        key = f"{stream}_localization"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = LocalizationMetrics(self.variants, self._thresholds(stream), HEADLINE_TAU)
        return self.eval_metrics[key].to(self.device)  # type: ignore[return-value]

    def _evaluate(self, batch: StreamBatch, stream: str) -> None:
        images, targets = self._memory_format(batch.views[0]), batch.targets
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.localizes:
                logits, feature_map = self.backbone.forward_with_map(images.float())
            else:
                logits, feature_map = self.backbone(images.float()), None
        logits = logits.float()
        predictions = (logits - self.log_prior).argmax(dim=1) if self.posthoc_logit_adjust else logits.argmax(dim=1)
        self._class_metrics(stream).update(logits, targets, predictions)
        if stream == "test":
            self.test_confusion.update(predictions, targets)
            self.test_reliability.update(logits, targets)
        if feature_map is None:
            return
        split = "test" if stream == "test_monitor" else stream
        gt_boxes = self._boxes[split].to(images.device)[batch.indices]
        image_size = int(images.shape[-1])
        ious = localization_ious(
            feature_map.float(), self.backbone.classifier_weight.float(), logits, targets, gt_boxes,
            image_size=image_size, thresholds=self._thresholds(stream), variants=MAP_VARIANTS,
            region_ks=self.region_ks, region_padding=self.region_padding, box_mode=self.box_mode,
            iou_convention=self.iou_convention, num_threads=self.box_threads,
        )
        self._localization_metrics(stream).update(
            ious, predictions == targets, topk_correct(logits, targets, 5)
        )
        if stream == "test" and self.overlays is None:
            self.overlays = self._overlay_examples(images, feature_map, logits, targets, gt_boxes)

    def _overlay_examples(
        self, images: torch.Tensor, feature_map: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The headline infoCAM map (mean_others, largest k) and boxes of the first test images."""
        n = min(self.overlay_images, images.shape[0])
        k = self.region_ks[-1]
        raw = activation_maps(feature_map[:n].float(), self.backbone.classifier_weight.float(), logits[:n],
                              targets[:n], "mean_others")
        maps = upsample_normalize(region_sum(raw, k, self.region_padding), int(images.shape[-1])).cpu()
        tau = self.selected_thresholds.get(variant_key("mean_others", k), HEADLINE_TAU)
        boxes = extract_boxes(maps, tau, mode=self.box_mode)
        return {"images": images[:n].float().cpu(), "maps": maps, "gt_boxes": gt_boxes[:n].float().cpu(),
                "pred_boxes": boxes.boxes.float(), "has_box": boxes.has_box, "threshold": torch.tensor(tau)}

    def _log_stream(self, stream: str) -> None:
        values: dict[str, float] = {}
        key = f"{stream}_classes"
        if key in self.eval_metrics:
            values.update({k: float(v) for k, v in self.eval_metrics[key].compute().items()})
            self.eval_metrics[key].reset()
            self._check_count(stream, int(values["count"]))
        key = f"{stream}_localization"
        if key in self.eval_metrics:
            localization = self.eval_metrics[key].compute()
            self.eval_metrics[key].reset()
            values.update(self._localization_values(stream, localization))
        if not values:
            return
        self.log_dict({f"{stream}/{k}": v for k, v in values.items()})
        if stream == "test_monitor" and not self.trainer.sanity_checking:
            self.eval_history.append({"step": self.global_step, **values})

    def _check_count(self, stream: str, count: int) -> None:
        """Every image of the split evaluated exactly once, whatever the number of ranks (spec §4)."""
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "split_size") or self.trainer.sanity_checking:
            return
        limit = self.trainer.limit_test_batches if stream == "test" else self.trainer.limit_val_batches
        if self.trainer.fast_dev_run or isinstance(limit, int) or limit < 1.0:
            return  # a deliberately partial pass (fast_dev_run, limit_*_batches) cannot cover the split
        expected = datamodule.split_size("test" if stream == "test_monitor" else stream)
        if count != expected:
            raise RuntimeError(f"{stream}: evaluated {count} images, but the split has {expected}")

    def _localization_values(self, stream: str, localization: dict[str, float]) -> dict[str, float]:
        """Headline (τ = 0.2) numbers of every variant; on val the selected τ; on test the numbers at the
        val-selected τ and the maximum over τ, which is an oracle there."""
        values = {k: v for k, v in localization.items() if "@" not in k and not k.endswith(("max_box_acc",
                                                                                               "best_threshold"))}
        values["loc_count"] = values.pop("count")
        for name in ("top1_cls", "top1_err", "top5_cls"):
            values.pop(name, None)  # the classification metrics report these already
        if stream == "val":
            for variant in self.variants:
                tau = localization[f"{variant}/best_threshold"]
                values[f"{variant}/best_threshold"] = tau
                values[f"{variant}/max_box_acc"] = localization[f"{variant}/max_box_acc"]
                if not self.trainer.sanity_checking:
                    self.selected_thresholds[variant] = tau
        elif stream == "test":
            for variant in self.variants:
                values[f"{variant}/max_box_acc_oracle"] = localization[f"{variant}/max_box_acc"]
                tau = self.selected_thresholds.get(variant)
                if tau is not None:
                    label = f"{tau:.2f}"
                    values[f"{variant}/val_tau"] = tau
                    values[f"{variant}/gt_known_loc_val_tau"] = localization[f"{variant}/gt_known_loc@{label}"]
                    values[f"{variant}/top1_loc_val_tau"] = localization[f"{variant}/top1_loc@{label}"]
        return values

    def on_validation_epoch_end(self) -> None:
        # Every evaluation split of the DataModule (CUB-imbalanced adds ``test_full``).
        streams = getattr(self._datamodule(), "eval_streams", ["val", "test"])
        for stream in streams:
            self._log_stream("test_monitor" if stream == "test" else stream)
