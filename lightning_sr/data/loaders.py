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

Under several processes the sampler shards the epoch's order itself, as ``DistributedSampler``
does (every rank draws the same permutation and takes every ``world size``-th item, the order
padded to a multiple of the world size). It subclasses ``DistributedSampler`` for that reason:
Lightning leaves such a sampler as it is, where it would wrap any other in its own distributed
sampler, whose position the loader could only restore by replaying the wrong epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochShuffle(DistributedSampler):
    """A random order of ``size`` items for each epoch, a function of ``seed`` and the epoch,
    sharded over the processes, which resumes from its saved state (epoch, items drawn by this
    process) at the item where it stopped.

    ``num_replicas`` and ``rank`` default to the process group's when one is initialized (as
    when Lightning asks for the train loader under DDP), else to one process.
    """

    def __init__(self, size: int, seed: int, num_replicas: int | None = None, rank: int | None = None):
        # DistributedSampler.__init__ is not called: it needs a process group, this works without
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.size, self.seed, self.epoch, self.shuffle = size, seed, 0, True
        self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.drawn = self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # the earlier epochs' draws: O(epoch x size), cheap
            torch.randperm(self.size, generator=generator)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = (order * math.ceil(self.total_size / self.size))[: self.total_size]  # every rank as many
        mine = order[self.rank : self.total_size : self.num_replicas]
        self.drawn, self._resume_at = self._resume_at, 0
        for index in mine[self.drawn :]:
            self.drawn += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "drawn": self.drawn, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position. Raises ``ValueError`` if the checkpoint was written by
        another number of processes: which items each process draws, and how many make a global
        batch, depend on it, so that run cannot be continued exactly."""
        saved = state.get("num_replicas", self.num_replicas)  # absent from checkpoints of older versions
        if saved != self.num_replicas:
            raise ValueError(
                f"this checkpoint was written by a run of {saved} training processes; resume it on "
                f"{saved} (--trainer.devices={saved} on one node): the batches each process draws depend "
                f"on the number of processes. To continue on {self.num_replicas}, start a new run "
                "from the exported weights (python -m lightning_sr.export)."
            )
        self.epoch, self._resume_at = state["epoch"], state["drawn"]
        if self._resume_at >= self.num_samples:  # saved at the end of an epoch: the next one starts afresh
            self.epoch, self._resume_at = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.num_samples


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
