"""Callbacks a user might add through a ``callbacks/*.yaml`` file, and a schedule of their own
(importable in tests).

Written once on lightning-sr's stand-in ``Callback``; the module's ``__getattr__`` hands a class
path such as ``user_callbacks.RecordingCallback`` the class built for the Lightning package in use.
"""

import json
from pathlib import Path

import torch

from lightning_sr.generation import DecodeState
from lightning_sr.lightning_packages import Callback, resolve


class _RecordingCallback(Callback):
    """Writes what it saw (batches, generation steps, results) to a JSON file at predict end."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.seen = {"batches": 0, "steps": 0, "decisions": 0, "results": 0}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen["batches"] += 1

    def on_generation_step(self, trainer, pl_module, event):
        self.seen["steps"] += 1
        self.seen["decisions"] += int(event.decision)

    def on_generation_end(self, trainer, pl_module, results):
        self.seen["results"] += len(results)

    def on_predict_end(self, trainer, pl_module):
        self.path.write_text(json.dumps(self.seen))


class _FailAtBatch(Callback):
    """Simulates a crash: raises when predict reaches batch ``batch_idx``."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch_idx:
            raise RuntimeError(f"simulated crash at batch {batch_idx}")


class EveryKTokens:
    """A user's schedule (no lightning_sr base class): decide at every multiple of ``k`` tokens."""

    def __init__(self, k: int = 4):
        self.k = k

    def kv_budget(self, device: torch.device) -> int | None:
        return None

    def next_check(self, state: DecodeState) -> int | None:
        return (state.step // self.k + 1) * self.k

    def should_decide(self, state: DecodeState) -> bool:
        return state.step % self.k == 0


def __getattr__(name):
    if f"_{name}" not in globals():
        raise AttributeError(name)
    return resolve(globals()[f"_{name}"])
