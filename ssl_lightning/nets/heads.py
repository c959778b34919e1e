"""Projection heads for contrastive and similarity-based objectives (SimCLR, SimMatch, InfoMatch)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """(Linear → [BN] → ReLU) × (num_layers − 1) → Linear, optionally L2-normalised.

    Args:
        in_dim: input (backbone feature) size.
        hidden_dim: width of the hidden layers.
        out_dim: embedding size.
        num_layers: number of Linear layers; 1 gives a single linear map.
        batch_norm: BN after each hidden Linear (SimCLR). The SimMatch and InfoMatch specs use
            `batch_norm=False`. With BN a training batch needs more than one row.
        normalize: return unit-norm rows, for cosine similarities.
        eps: floor on the norm; an untrained head can output rows of norm ≈ 0.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        normalize: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        prev = in_dim
        for _ in range(num_layers - 1):
            # A bias right before BN is cancelled by its mean subtraction.
            layers.append(nn.Linear(prev, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            prev = hidden_dim
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.normalize = normalize
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        return F.normalize(z, dim=-1, eps=self.eps) if self.normalize else z
