"""Training batches in a seeded order whose position is saved in checkpoints.

A resumed ``fit`` must end exactly where an uninterrupted one would, also when it resumes in the
middle of an epoch. Two pieces make that so, both the way Lightning expects:

- the order: :class:`EpochShuffle` draws epoch ``e``'s permutation as the ``(e+1)``-th
  ``torch.randperm`` of a generator seeded with ``seed``: a function of ``seed`` and the epoch
  alone, and Lightning tells it the epoch (``set_epoch``, as for its own ``DistributedSampler``),
  so no RNG state has to survive a restart;
- the position: Lightning saves and restores the state of any train loader that has
  ``state_dict`` / ``load_state_dict``; torchdata's ``StatefulDataLoader`` saves its sampler's
  state with it, which here is the epoch and how many items of it were drawn (as torchdata's own
  ``StatefulDistributedSampler`` does). Restoring the epoch with the position matters: on a
  mid-epoch restart Lightning creates the iterator before it calls ``set_epoch``.

Under several processes Lightning wraps the sampler into its distributed sampler (seeded and set
to the epoch by Lightning) and the loader fast-forwards that one the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochShuffle(Sampler[int]):
    """A random order of ``size`` items for each epoch, a function of ``seed`` and the epoch,
    which resumes from its saved state (epoch, items drawn) at the item where it stopped."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0
        self.drawn = self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # the earlier epochs' draws: O(epoch x size), cheap
            torch.randperm(self.size, generator=generator)
        order = torch.randperm(self.size, generator=generator).tolist()
        self.drawn, self._resume_at = self._resume_at, 0
        for index in order[self.drawn :]:
            self.drawn += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at = state["epoch"], state["drawn"]
        if self._resume_at >= self.size:  # saved at the end of an epoch: the next one starts afresh
            self.epoch, self._resume_at = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.size


def training_loader(
    dataset: Any,
    batch_size: int,
    seed: int,
    collate_fn: Callable,
    num_workers: int = 0,
    drop_last: bool = False,
) -> StatefulDataLoader:
    """A shuffled training loader, seeded with ``seed``, that Lightning checkpoints and resumes."""
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
