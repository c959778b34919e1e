"""A memory bank with one unit-norm embedding slot per labeled example (SimMatch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.components.collectives import all_gather_equal


class LabeledMemoryBank(nn.Module):
    """Embeddings Z (K×D, unit rows) and labels y^Z (K) of the labeled set, K = its size.

    Slots are addressed by position in the labeled subset. Batches carry indices into the training
    pool, so the bank keeps the sorted pool indices of its slots and maps through them, refusing an
    index that is not in the labeled subset (writing at the pool index instead is a classic silent bug).

    Update rule for a gathered batch (z_j, y_j, i_j) of all ranks (``update``): for every distinct slot i,

        z̄_i = normalize(Σ_{j: i_j = i} z_j)                    (deterministic mean over duplicates)
        Z_i = normalize(m·Z_i + (1 − m)·z̄_i),  y^Z_i = y,  visited_i = true

    with m the bank momentum (0: overwrite). Rows with a non-finite embedding are skipped and counted in
    ``nonfinite_skips``. Every rank applies the same update to the same gathered batch, so the bank is
    identical everywhere and equal to a single process on the global batch.

    The buffers are sized by ``reset`` once the labeled subset is known; loading a state dict resizes
    them, so a checkpoint loads into a fresh module.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    pool_indices: torch.Tensor
    visited: torch.Tensor
    nonfinite_skips: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.7, sync: bool = True) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        self.dim = dim
        self.momentum = momentum
        self.sync = sync
        self.register_buffer("embeddings", torch.empty(0, dim))
        self.register_buffer("labels", torch.empty(0, dtype=torch.int64))
        self.register_buffer("pool_indices", torch.empty(0, dtype=torch.int64))
        self.register_buffer("visited", torch.empty(0, dtype=torch.bool))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, momentum={self.momentum}, sync={self.sync}"

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def reset(self, pool_indices: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, seed: int) -> None:
        """Size the bank for a labeled subset: N(0, 1) rows from ``seed``, L2-normalised; true labels."""
        pool_indices = torch.as_tensor(np.asarray(pool_indices), dtype=torch.int64)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if pool_indices.ndim != 1 or pool_indices.shape != labels.shape or len(pool_indices) == 0:
            raise ValueError("the labeled subset needs one label per index and at least one example")
        order = torch.argsort(pool_indices)
        pool_indices, labels = pool_indices[order], labels[order]
        if (pool_indices[1:] == pool_indices[:-1]).any():
            raise ValueError("the labeled subset lists an index twice")
        generator = torch.Generator().manual_seed(seed)
        embeddings = F.normalize(torch.randn(len(pool_indices), self.dim, generator=generator), dim=1)
        device = self.embeddings.device
        self.embeddings = embeddings.to(device)
        self.labels = labels.to(device)
        self.pool_indices = pool_indices.to(device)
        self.visited = torch.zeros(len(pool_indices), dtype=torch.bool, device=device)

    def slots(self, pool_indices: torch.Tensor) -> torch.Tensor:
        """Bank positions of training-pool indices; raises if one is not a labeled example."""
        slots = torch.searchsorted(self.pool_indices, pool_indices).clamp(max=self.size - 1)
        if not torch.equal(self.pool_indices[slots], pool_indices):
            missing = pool_indices[self.pool_indices[slots] != pool_indices].tolist()[:5]
            raise IndexError(f"pool indices {missing} are not in the labeled subset this bank was built for")
        return slots

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, pool_indices: torch.Tensor) -> None:
        """Apply the update rule to this rank's batch gathered with every other rank's (see class doc)."""
        if self.size == 0:
            raise RuntimeError("the memory bank is empty: call reset() with the labeled subset first")
        embeddings = embeddings.detach().float()
        labels, pool_indices = labels.to(torch.int64), pool_indices.to(torch.int64)
        if self.sync:
            embeddings = all_gather_equal(embeddings)
            labels, pool_indices = all_gather_equal(labels), all_gather_equal(pool_indices)
        slots = self.slots(pool_indices)
        finite = torch.isfinite(embeddings).all(dim=1)
        self.nonfinite_skips += (~finite).sum()
        embeddings, labels, slots = embeddings[finite], labels[finite], slots[finite]
        if slots.numel() == 0:
            return
        # Summing duplicates with index_add (then normalising) is order-independent up to float
        # rounding, unlike an indexed assignment whose winner is undefined on GPUs. Only the touched
        # slots are summed: the whole bank is 65 MB at ImageNet-10%.
        touched, position = torch.unique(slots, return_inverse=True)
        sums = embeddings.new_zeros(len(touched), self.dim).index_add_(0, position, F.normalize(embeddings, dim=1))
        batch_mean = F.normalize(sums, dim=1, eps=1e-12)
        blended = self.momentum * self.embeddings[touched] + (1.0 - self.momentum) * batch_mean
        self.embeddings[touched] = F.normalize(blended, dim=1, eps=1e-12)
        self.labels[slots] = labels
        self.visited[touched] = True

    def visited_fraction(self) -> torch.Tensor:
        return self.visited.float().mean() if self.size else self.visited.new_zeros((), dtype=torch.float32)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Resize the slot buffers to the checkpoint's labeled subset before the default copy.
        for name in ("embeddings", "labels", "pool_indices", "visited"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, torch.empty_like(incoming, device=current.device, dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
