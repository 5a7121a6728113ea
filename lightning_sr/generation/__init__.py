"""The generation engine: batched decoding with droppable rows, Speculative Rejection, Best-of-N.

Plain PyTorch + transformers; no Lightning import, so it works from any loop.
"""

from lightning_sr.generation.memory import cache_bytes, kv_bytes_per_token
from lightning_sr.generation.rejection import best_of_n, keep_count, speculative_rejection
from lightning_sr.generation.results import Candidate, GenerationResult, GenerationStats, StepEvent
from lightning_sr.generation.rollout import Rollout, prefill
from lightning_sr.generation.sampling import SamplingParams, sample_next_token
from lightning_sr.generation.schedules import FixedSchedule, MemorySchedule

__all__ = [
    "SamplingParams",
    "sample_next_token",
    "MemorySchedule",
    "FixedSchedule",
    "speculative_rejection",
    "best_of_n",
    "keep_count",
    "GenerationResult",
    "GenerationStats",
    "Candidate",
    "StepEvent",
    "Rollout",
    "prefill",
    "kv_bytes_per_token",
    "cache_bytes",
]
