"""Which examples form each micro-batch, and the seed of each micro-batch: pure functions of (seed, index, rank).

Nothing here depends on loop position or loader state, so a run resumed at step N replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import torch


def _perm(n: int, seed: int, epoch: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % 2**63)
    return torch.randperm(n, generator=g).tolist()


class DataOrder:
    """Which examples form micro-batch m on process `rank`: a fresh permutation per epoch, last batch dropped."""

    def __init__(self, n_items: int, n_class: int, batch: int, processes: int, seed: int) -> None:
        self.n_items, self.n_class, self.batch, self.processes, self.seed = n_items, n_class, batch, processes, seed
        self.batches_per_epoch = n_items // (batch * processes)

    def epoch_of(self, m: int) -> int:
        return m // self.batches_per_epoch

    def instance_items(self, m: int, rank: int) -> list[int]:
        perm = _perm(self.n_items, self.seed, self.epoch_of(m), 0)
        start = ((m % self.batches_per_epoch) * self.processes + rank) * self.batch
        return perm[start : start + self.batch]

    def class_items(self, m: int, rank: int) -> list[int]:
        out = []
        for i in range(self.batch):
            pos = (m * self.processes + rank) * self.batch + i
            out.append(_perm(self.n_class, self.seed, pos // self.n_class, 1)[pos % self.n_class])
        return out


def step_seed(seed: int, m: int, rank: int) -> int:
    """The global-RNG seed of micro-batch m on process rank (crop, flip, latent sample, timesteps, noise)."""
    return (seed * 2_654_435_761 + m * 1_000 + rank + 1) % 2**63
