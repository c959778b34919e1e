"""The collision clustering module (spec §3.3, §3.6, §8 test 18): the θ-step trains on the y the solver
returns, the switches reduce to what they name, and every baseline gives a finite loss with gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.data.module import StreamBatch
from ssl_lightning.losses.collision import collision_cross_entropy
from ssl_lightning.methods import Collision
from ssl_lightning.solvers import solve_pseudo_labels


def _model(**kwargs: object) -> Collision:
    torch.manual_seed(0)
    return Collision(num_classes=4, in_channels=1, image_size=8, backbone="mlp",
                     backbone_args={"hidden_dims": [16]}, **kwargs)


def _batch(n: int = 12, labeled: bool = False) -> dict[str, StreamBatch]:
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(n, 1, 8, 8, generator=generator) for _ in range(2)]
    batch = {"unlabeled": StreamBatch(views, torch.full((n,), -1), torch.arange(n))}
    if labeled:
        batch["labeled"] = StreamBatch([torch.randn(4, 1, 8, 8, generator=generator)], torch.tensor([0, 1, 2, 3]),
                                       torch.arange(4))
    return batch


def test_collision_step_trains_on_the_em_solution() -> None:
    model = _model(em_iters=3, aug_weight=0.5)
    batch = _batch()
    terms = model.compute_losses(batch)
    clean, augmented = model.forward_views(batch["unlabeled"].views)
    sigma = torch.softmax(clean.detach().double(), dim=1).numpy()
    y, _ = solve_pseudo_labels(sigma, 100.0, iters=3)
    y = torch.as_tensor(y, dtype=torch.float32)
    expected = collision_cross_entropy(clean, y) + 0.5 * collision_cross_entropy(augmented, y)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)


def test_argmax_solver_is_hard_pseudo_label_cross_entropy() -> None:
    model = _model(solver="argmax", aug_weight=0.5)
    batch = _batch()
    terms = model.compute_losses(batch)
    clean, augmented = model.forward_views(batch["unlabeled"].views)
    hard = clean.argmax(dim=1)
    expected = F.cross_entropy(clean, hard) + 0.5 * F.cross_entropy(augmented, hard)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    # On one-hot targets the Shannon network loss is the same number.
    shannon = _model(solver="argmax", aug_weight=0.5, network_loss="shannon").compute_losses(batch)["loss"]
    torch.testing.assert_close(shannon, expected, rtol=1e-5, atol=1e-6)


def test_loss_none_in_weak_mode_is_the_supervised_term_alone() -> None:
    model = _model(loss="none")
    batch = _batch(labeled=True)
    terms = model.compute_losses(batch)
    logits = model(batch["labeled"].views[0])
    torch.testing.assert_close(terms["loss"], F.cross_entropy(logits, batch["labeled"].targets))


@pytest.mark.parametrize("loss", ["collision", "collision_fwd", "miadm", "sela", "imsat", "iic", "migd"])
def test_every_loss_option_is_finite_and_reaches_the_weights(loss: str) -> None:
    model = _model(loss=loss, em_iters=2, pgd_iters=5)
    terms = model.compute_losses(_batch(labeled=True))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.backbone.head.weight.grad is not None and model.backbone.head.weight.grad.abs().sum() > 0


def test_em_is_refused_for_losses_it_does_not_solve() -> None:
    with pytest.raises(ValueError, match="solver=pgd"):
        _model(loss="collision_fwd", solver="em")


def test_kmeans_mode_predicts_the_nearest_centroid() -> None:
    model = _model(loss="kmeans")
    model.centroids = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    points = torch.tensor([[1.0, -1.0], [9.0, 11.0], [6.0, 6.0]]).view(3, 2, 1, 1)
    assert model(points).argmax(dim=1).tolist() == [0, 1, 1]


def test_per_batch_sum_scales_lambda_by_the_global_batch() -> None:
    assert _model(fairness_scale="mean").effective_lambda(250) == 100.0
    assert _model(fairness_scale="per_batch_sum").effective_lambda(250) == pytest.approx(0.4)
    assert _model(loss="miadm").effective_lambda(250) == pytest.approx(1.3)


def test_results_are_filed_under_the_loss_option() -> None:
    assert [_model(loss=name).method_name for name in ("collision", "collision_fwd", "imsat")] == [
        "collision", "collision_fwd", "collision_imsat"]
    assert np.isclose(_model().lambda_fair, 100.0)
