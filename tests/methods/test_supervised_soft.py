"""The supervised method's soft-target losses: equal to CE on one-hot targets, looked up by pool index,
filled from the DataModule at setup, and refused clearly without soft labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from ssl_lightning.data import DigitsDataModule
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.methods import Supervised


def _digits(tmp_path: Path, **kwargs: Any) -> DigitsDataModule:
    dm = DigitsDataModule(data_dir=str(tmp_path), num_labels=None, batch_size=32, labeled_views=["weak"], seed=0,
                          **kwargs)
    dm.setup("fit")
    return dm


def _model(loss: str, seed: int = 0) -> Supervised:
    torch.manual_seed(seed)
    return Supervised(num_classes=10, in_channels=1, image_size=16, backbone="small_cnn",
                      backbone_args={"widths": [8, 16]}, ema_decay=None, loss=loss)


def _labeled_batch(dm: DigitsDataModule) -> dict[str, StreamBatch]:
    raw = next(iter(dm.train_dataloader()["labeled"]))
    return {"labeled": dm.on_after_batch_transfer({"labeled": raw}, 0)["labeled"]}


def _loss_and_grads(model: Supervised, batch: dict[str, StreamBatch]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model.compute_losses(batch)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.backbone.parameters()]


@pytest.mark.parametrize("soft_loss", ["collision", "shannon"])
def test_soft_losses_on_one_hot_targets_equal_ce(tmp_path: Path, soft_loss: str) -> None:
    dm = _digits(tmp_path, soft_label_noise="dirichlet", soft_label_epsilon=0.0)
    ce_model, soft_model = _model("ce"), _model(soft_loss, seed=1)
    soft_model.backbone.load_state_dict(ce_model.backbone.state_dict())
    soft_model.attach_soft_targets(dm)
    batch = _labeled_batch(dm)
    # Train mode on both: BatchNorm uses batch statistics, so both see the same forward.
    ce_loss, ce_grads = _loss_and_grads(ce_model.train(), batch)
    soft_loss_value, soft_grads = _loss_and_grads(soft_model.train(), batch)
    torch.testing.assert_close(soft_loss_value, ce_loss, rtol=1e-6, atol=1e-6)
    for ours, reference in zip(soft_grads, ce_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_soft_targets_are_looked_up_by_pool_index(tmp_path: Path) -> None:
    dm = _digits(tmp_path, soft_label_noise="dirichlet", soft_label_epsilon=0.7)
    table = dm.soft_targets()
    batch = _labeled_batch(dm)
    targets = table[batch["labeled"].indices]
    for loss in ("collision", "shannon"):
        model = _model(loss).eval()
        model.attach_soft_targets(dm)
        value = model.compute_losses(batch)["loss"]
        with torch.no_grad():
            probs = F.softmax(model(batch["labeled"].views[0]).double(), dim=1)
        expected = (
            -torch.log((probs * targets.double()).sum(1)).mean()
            if loss == "collision"
            else -(targets.double() * torch.log(probs)).sum(1).mean()
        )
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    # Soft, not hard: with ε = 0.7 the collision loss differs from CE on the split labels.
    model = _model("collision").eval()
    model.attach_soft_targets(dm)
    with torch.no_grad():
        hard = F.cross_entropy(model(batch["labeled"].views[0]), batch["labeled"].targets)
    assert abs(float(model.compute_losses(batch)["loss"]) - float(hard)) > 1e-3


def test_soft_loss_without_soft_labels_fails_clearly(tmp_path: Path) -> None:
    dm = _digits(tmp_path)
    model = _model("collision")
    with pytest.raises(ValueError, match="--data.soft_label_noise"):
        model.attach_soft_targets(dm)
    with pytest.raises(RuntimeError, match="needs soft targets"):
        model.compute_losses(_labeled_batch(dm))


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        _model("hinge")


def test_training_fills_the_buffer_at_setup_and_keeps_it_out_of_checkpoints(tmp_path: Path) -> None:
    dm = DigitsDataModule(data_dir=str(tmp_path), num_labels=None, batch_size=16, num_workers=0, seed=0,
                          soft_label_noise="dirichlet", soft_label_epsilon=0.6)
    model = _model("collision")
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    torch.testing.assert_close(model.soft_targets, dm.soft_targets())
    assert "soft_targets" not in model.state_dict()
    assert model.hparams["loss"] == "collision"
