"""Which items form each micro-batch, and the seed of each micro-batch: pure functions of (seed, index, rank).

Nothing here depends on loop position or loader state, so a run resumed at step N replays exactly what an
uninterrupted run would have done. With aspect-ratio buckets the same holds: the bucket of every item is
fixed by the data, so the epoch's batches are too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Sequence

import torch

from sd3booth.data.buckets import batch_shapes


def _perm(n: int, seed: int, epoch: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % 2**63)
    return torch.randperm(n, generator=g).tolist()


class DataOrder:
    """Which items form micro-batch m on process ``rank``.

    Each epoch the items of each training size (bucket) are shuffled and cut into batches, the last partial
    batch of a size kept (as the diffusers reference's DataLoader keeps its last batch); then the batches are
    shuffled. A batch never mixes sizes. Processes take the epoch's batches in turn; when the batches do not
    divide evenly, the last processes repeat the epoch's first batches (as accelerate's even batches do).
    """

    def __init__(self, sizes: Sequence[Hashable], batch: int, processes: int, seed: int) -> None:
        self.batch, self.processes, self.seed = batch, processes, seed
        groups: dict[Hashable, list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        self.keys = sorted(groups, key=repr)
        self.groups = [groups[k] for k in self.keys]
        self.n_batches = sum(math.ceil(len(g) / batch) for g in self.groups)
        self.batches_per_epoch = math.ceil(self.n_batches / processes) if self.n_batches else 0
        self._cache: tuple[int, list[list[int]]] | None = None
        self.fingerprint = hashlib.sha256(json.dumps([repr(s) for s in sizes]).encode()).hexdigest()[:16]

    def epoch_of(self, m: int) -> int:
        return m // self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch, in the order they are taken."""
        if self._cache is None or self._cache[0] != epoch:
            batches = []
            for salt, group in enumerate(self.groups, start=1):
                shuffled = [group[i] for i in _perm(len(group), self.seed, epoch, salt)]
                batches += [shuffled[i : i + self.batch] for i in range(0, len(shuffled), self.batch)]
            self._cache = (epoch, [batches[i] for i in _perm(len(batches), self.seed, epoch, 0)])
        return self._cache[1]

    def items(self, m: int, rank: int) -> list[int]:
        """The item indices of micro-batch m on process rank."""
        j = (m % self.batches_per_epoch) * self.processes + rank
        return self.epoch_batches(self.epoch_of(m))[j % self.n_batches]

    def shapes(self) -> set[tuple[Hashable, int]]:
        """Every (size, items in the batch) a batch can have: the shapes compiled blocks see."""
        return batch_shapes({k: len(g) for k, g in zip(self.keys, self.groups)}, self.batch)


def step_seed(seed: int, m: int, rank: int) -> int:
    """The global-RNG seed of micro-batch m on process rank (crop, flip, latent sample, timesteps, noise)."""
    return (seed * 2_654_435_761 + m * 1_000 + rank + 1) % 2**63
