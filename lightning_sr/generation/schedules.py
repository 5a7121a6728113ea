"""When speculative rejection stops to score partial responses and reject the weakest.

A schedule answers one question before every decoding step: is this a decision point?
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_sr.generation.memory import free_cuda_bytes


@dataclass
class MemorySchedule:
    """The paper's memory-driven decision points.

    A decision happens when one more token for every live row would push the KV cache past the
    budget, but never before ``min_tokens`` tokens were generated. ``budget_bytes=None`` uses the
    free CUDA memory after the models are loaded minus ``margin_fraction`` of the device's total;
    on CPU an explicit budget is required.
    """

    budget_bytes: int | None = None
    min_tokens: int = 16
    margin_fraction: float = 0.1

    def __post_init__(self):
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"MemorySchedule.budget_bytes must be positive, got {self.budget_bytes}")
        if self.min_tokens < 1:
            raise ValueError(f"MemorySchedule.min_tokens must be >= 1, got {self.min_tokens}")

    def resolve_budget(self, device: torch.device) -> int:
        """The KV-cache budget in bytes for a generator on ``device``."""
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        if device.type != "cuda":
            raise ValueError(
                "MemorySchedule(budget_bytes=None) measures free CUDA memory, but the generator is on "
                f"{device.type!r}: give an explicit budget, e.g. MemorySchedule(budget_bytes=2**30), "
                "or use FixedSchedule(lengths=[...])."
            )
        return free_cuda_bytes(device, self.margin_fraction)


@dataclass
class FixedSchedule:
    """Decision points at fixed generated lengths, e.g. ``[32, 64, 128]``."""

    lengths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if any(length < 1 for length in self.lengths):
            raise ValueError(f"FixedSchedule.lengths must be positive, got {self.lengths}")
        self.lengths = sorted(set(int(length) for length in self.lengths))


Schedule = MemorySchedule | FixedSchedule
