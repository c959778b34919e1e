"""Supervised baseline: cross-entropy on the labeled stream only, with hard labels or soft targets.

The soft-target losses serve the soft-label robustness experiment (collision-CE spec §6.3): the
DataModule draws soft targets for its labeled pool (``--data.soft_label_noise``) and the method trains
on them with Shannon's or the collision cross-entropy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.collision import collision_cross_entropy, soft_cross_entropy
from ssl_lightning.methods.base import Method, cross_entropy

SupervisedLoss = Literal["ce", "shannon", "collision"]
SUPERVISED_LOSSES: tuple[str, ...] = ("ce", "shannon", "collision")


class Supervised(Method):
    """L = (1/B) Σ_b ℓ(f(weak(x_b)), ·) over the labeled batch, with ℓ chosen by ``loss``:

    - ``ce``: CE(z_b, c_b) with the hard (split) labels c_b.
    - ``shannon``: H(y_b, softmax z_b) = −Σ_k y_bk ln σ_bk with the DataModule's soft targets y_b.
    - ``collision``: H₂(y_b, softmax z_b) = −ln Σ_k y_bk σ_bk with the same soft targets.

    For one-hot targets all three coincide. The soft targets are looked up by the batch's pool
    ``indices`` in a non-persistent buffer filled at ``setup`` (never checkpointed: the DataModule's
    sha256-checked file is their record).

    Args:
        loss: ``ce``, ``shannon`` or ``collision``.
        **kwargs: the shared arguments of :class:`~ssl_lightning.methods.base.Method`.
    """

    labeled_views: ClassVar[list[str]] = ["weak"]
    unlabeled_views: ClassVar[list[str]] = []

    def __init__(self, loss: SupervisedLoss = "ce", **kwargs: Any) -> None:
        if loss not in SUPERVISED_LOSSES:
            raise ValueError(f"loss must be one of {SUPERVISED_LOSSES}, got {loss!r}")
        super().__init__(**kwargs)
        self.loss = loss
        self.register_buffer("soft_targets", torch.zeros(0, self.num_classes), persistent=False)

    @property
    def uses_soft_targets(self) -> bool:
        return self.loss != "ce"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.uses_soft_targets:
            self.attach_soft_targets(getattr(self.trainer, "datamodule", None))

    def attach_soft_targets(self, datamodule: Any) -> None:
        """Copy the DataModule's soft targets (``(N_pool, K)``, by pool index) into the buffer."""
        if datamodule is None or not getattr(datamodule, "has_soft_labels", False):
            raise ValueError(
                f"loss={self.loss!r} trains on soft targets, but the DataModule "
                f"({type(datamodule).__name__}) has none: set --data.soft_label_noise=dirichlet or uniform "
                "(and --data.soft_label_epsilon), or use --model.loss=ce"
            )
        targets = datamodule.soft_targets()
        if targets.ndim != 2 or targets.shape[1] != self.num_classes:
            raise ValueError(f"soft targets of shape {tuple(targets.shape)} do not fit {self.num_classes} classes")
        self.soft_targets = targets.to(device=self.device, dtype=torch.float32)

    def compute_losses(self, batch: dict[str, StreamBatch]) -> dict[str, torch.Tensor]:
        labeled = batch["labeled"]
        logits = self(labeled.views[0])
        if not self.uses_soft_targets:
            return {"loss": cross_entropy(logits, labeled.targets)}
        if self.soft_targets.shape[0] == 0:
            raise RuntimeError(f"loss={self.loss!r} needs soft targets: call setup() or attach_soft_targets() first")
        targets = self.soft_targets[labeled.indices]
        loss_fn = collision_cross_entropy if self.loss == "collision" else soft_cross_entropy
        return {"loss": loss_fn(logits, targets)}
