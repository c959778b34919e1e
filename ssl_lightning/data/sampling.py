"""Samplers that make training independent of the GPU count and exactly resumable.

A training stream is an endless sequence of dataset indices: the concatenation of seeded permutations,
one per pass over the set. Step ``k`` consumes the global batch ``stream[k*G : (k+1)*G]`` and rank ``r``
of ``W`` takes the ``r``-th contiguous slice of it. So the same samples form step ``k``'s global batch
on 1 or 8 GPUs, and a resumed run restarts the stream at ``k = global_step`` with nothing skipped or
repeated. Every draw also carries its position in the stream, from which the dataset seeds that
sample's augmentation: augmentations too are independent of world size, worker count and resumption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

T = TypeVar("T")
Draw = tuple[int, int]  # (dataset index, position of the draw in the stream)


def augmentation_seed(run_seed: int, stream_id: int, draw: int) -> int:
    """A 63-bit torch seed for one sample draw; distinct for every (run, stream, draw)."""
    # SeedSequence mixes its inputs well, so neighbouring draws get unrelated generator states.
    state = np.random.SeedSequence([run_seed & 0xFFFFFFFF, stream_id, draw]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class GlobalBatchStream(Sampler[list[Draw]]):
    """Yields this rank's share of each global batch, forever, starting at ``start_step``."""

    def __init__(
        self,
        indices: np.ndarray,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        stream_id: int = 0,
        start_step: int = 0,
    ) -> None:
        if len(indices) == 0:
            raise ValueError("cannot stream from an empty index set")
        if global_batch % world_size != 0:
            raise ValueError(
                f"global batch {global_batch} is not divisible by world size {world_size}; "
                "choose a batch size that splits evenly across the devices"
            )
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.stream_id = stream_id
        self.start_step = start_step
        self._cached_pass: tuple[int, np.ndarray] | None = None

    def _permutation(self, pass_number: int) -> np.ndarray:
        if self._cached_pass is None or self._cached_pass[0] != pass_number:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.stream_id, pass_number])
            self._cached_pass = (pass_number, self.indices[rng.permutation(len(self.indices))])
        return self._cached_pass[1]

    def stream_slice(self, start: int, stop: int) -> list[Draw]:
        """Draws at stream positions ``[start, stop)``."""
        n = len(self.indices)
        return [(int(self._permutation(p // n)[p % n]), p) for p in range(start, stop)]

    def batch_at(self, step: int) -> list[Draw]:
        per_rank = self.global_batch // self.world_size
        begin = step * self.global_batch + self.rank * per_rank
        return self.stream_slice(begin, begin + per_rank)

    def __iter__(self) -> Iterator[list[Draw]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


class ShardedEvalSampler(Sampler[int]):
    """Contiguous, non-overlapping shards with no padding, so no test image is counted twice."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        bounds = np.linspace(0, length, world_size + 1).astype(int)
        self.start, self.stop = int(bounds[rank]), int(bounds[rank + 1])

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def with_private_rng(fn: Callable[[], T]) -> T:
    """Run ``fn`` free to reseed torch's global generator without disturbing anyone else's draws.

    A DataLoader worker owns its generator, so ``fn`` simply runs; in the main process
    (``num_workers=0``) the state is forked and restored, so model-side randomness is unaffected.
    """
    if torch.utils.data.get_worker_info() is not None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        return fn()
