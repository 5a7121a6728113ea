"""Training batches in a seeded order whose position is saved in checkpoints.

A resumed ``fit`` must end exactly where an uninterrupted one would, also when it resumes in the
middle of an epoch. Lightning saves and restores the state of any train loader that has
``state_dict`` / ``load_state_dict``; torchdata's ``StatefulDataLoader`` has them and records how
far into the epoch it got, then fast-forwards a fresh iterator to that point when restored.

The order comes from :class:`EpochShuffle`: epoch ``e``'s permutation is the ``(e+1)``-th
``torch.randperm`` drawn from a generator seeded with ``seed``, a function of ``seed`` and the epoch
alone (Lightning calls ``set_epoch`` at the start of every epoch, also after resuming), so the
restored epoch is the same permutation, and so is every later one. An uninterrupted run sees the
order a loader shuffled by that one generator gives; but such a loader, resumed mid-epoch, shuffles
the *next* epoch differently (the generator's state at that epoch's start is not in the
checkpoint), which is why the epoch is recomputed here. Under several processes Lightning wraps the sampler for its ranks and the
loader fast-forwards it to the saved position.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

class EpochShuffle(Sampler[int]):
    """A permutation of ``range(size)`` that depends on ``seed`` and the epoch only (see above)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # the earlier epochs' draws: O(epoch * size), cheap
            torch.randperm(self.size, generator=generator)
        return iter(torch.randperm(self.size, generator=generator).tolist())


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
