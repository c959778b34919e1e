"""The few collectives stateful components use to keep their state identical on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """True when running with more than one process (collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op on one process); returns it."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank, in rank order (itself on one process)."""
    if not distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
