"""A deterministic, rank-aware sampler that resumes exactly where a run stopped.

Each epoch is one seeded permutation of the dataset, padded by wrap-around to a multiple of
world size x batch size; rank r takes positions r, r + W, r + 2W, ... So every rank gets the same
number of FULL batches every epoch, whatever the dataset size (even one smaller than W x B):
a DataLoader with drop_last never comes up empty, and no rank waits for another's extra batch. The position is kept as a GLOBAL count
of consumed samples, so a run can resume on a different world size (or batch size) and continue the
same permutation at exactly the next sample: nothing is repeated or skipped. When the samples left
in that epoch are not a multiple of the new W x B, the rest of the epoch is padded by wrap-around
as every epoch's end is.

DataLoader workers prefetch ahead of training, so the sampler cannot know what was consumed: the
trainer reports it with `advance(n)` (samples this rank consumed), and `state_dict()` records it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 batch_size: int = 1):
        if dataset_len <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.rank, self.world, self.seed, self.shuffle = dataset_len, rank, world_size, seed, shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0  # global samples consumed in this epoch (all ranks)
        self.start = 0  # where this world x batch began in the epoch: 0, or a resume's position

    @property
    def per_epoch(self) -> int:
        """Global samples in this epoch: dataset length padded up to a multiple of world x batch
        size (counted from `start` in the epoch a resume on another layout landed in)."""
        step = self.world * self.batch_size
        return self.start + -(-(self.n - self.start) // step) * step

    def __len__(self) -> int:
        """Samples this rank yields for the rest of the current epoch."""
        return (self.per_epoch - self.consumed) // self.world

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            base = torch.arange(self.n)
        else:
            base = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return base.repeat(-(-self.per_epoch // self.n))[: self.per_epoch]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        return iter(order[self.consumed + self.rank::self.world].tolist())

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank consumed `samples_per_rank` more samples; rolls into the next
        epoch when this one is exhausted."""
        self.consumed += samples_per_rank * self.world
        while self.consumed >= self.per_epoch:
            self.consumed -= self.per_epoch
            self.epoch, self.start = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.start = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "dataset_len": self.n,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["dataset_len"] != self.n or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(f"sampler state is for dataset_len={state['dataset_len']}, seed={state['seed']}, "
                             f"shuffle={state['shuffle']}; this run has {self.n}, {self.seed}, {self.shuffle}")
        self.epoch = int(state["epoch"])
        # continue at exactly the next sample; the epoch ends at the first multiple of this
        # world x batch past the dataset (a no-op on the same layout). Only padding was left
        # once `consumed` reached the dataset length: the next epoch starts
        self.consumed = self.start = int(state["consumed"])
        if self.consumed >= self.n:
            self.epoch, self.consumed, self.start = self.epoch + 1, 0, 0
