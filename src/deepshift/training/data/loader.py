"""``BatchLoader``: seeded, resumable mini-batches over an in-memory dataset."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from deepshift.training.data.datasets import ImageDataset


def _mix(*values: int) -> int:
    """A 63-bit seed that is a pure function of the given integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class BatchLoader:
    """Batches of a :class:`ImageDataset`; order and augmentation are pure functions of (seed, epoch).

    Iterating ``loader.epoch(e, start=k)`` yields batches ``k, k+1, ...`` of epoch ``e``, exactly the
    batches an uninterrupted epoch would have produced there; this is what makes mid-epoch resume exact.
    Iterating the loader itself walks its epochs one after another (0, 1, 2, ... : each ``iter()``
    is the next, with its own shuffle, as a torch ``DataLoader`` reshuffles), so a consumer that reads
    it again until it has enough batches (e.g. :func:`deepshift.finetune_batchnorm_`) sees new ones.
    The last partial batch is kept.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, train: bool, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self._iterations = 0  # the epoch the next iter() walks

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        if not self.train:
            return torch.arange(len(self.dataset))
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=g)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, b, 1)) if self.train else None
            yield self.dataset.get_batch(idx, self.train, g)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self._iterations += 1
        return self.epoch(self._iterations - 1)
