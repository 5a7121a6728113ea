"""Training batches in a seeded order whose position is saved in checkpoints.

A resumed ``fit`` must end exactly where an uninterrupted one would, also when it resumes in the
middle of an epoch. Lightning saves and restores the state of any train loader that has
``state_dict`` / ``load_state_dict``; torchdata's ``StatefulDataLoader`` has them and records the
shuffling generator and how far into the epoch it got. With the order seeded here (not from the
global RNG), the epoch order is a function of ``seed`` and the epoch alone. Under several processes
Lightning swaps in its ``DistributedSampler`` (seeded and set to the epoch by Lightning) and the
loader fast-forwards it to the saved position.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torchdata.stateful_dataloader import StatefulDataLoader


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
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
