"""The generation engine: Speculative Rejection and Best-of-N over a static, in-place KV cache.

Plain PyTorch + transformers; no Lightning import, so it works from any loop.
"""

from lightning_sr.generation.cache import StaticKVCache
from lightning_sr.generation.decision import keep_count, select_survivors
from lightning_sr.generation.memory import cache_bytes, kv_bytes_per_token
from lightning_sr.generation.prompts import context_length
from lightning_sr.generation.rejection import best_of_n, speculative_rejection
from lightning_sr.generation.results import Candidate, GenerationResult, GenerationStats, StepEvent
from lightning_sr.generation.rollout import DecodeOptions, Rollout, prefill
from lightning_sr.generation.sampling import SamplingParams, sample_next_token
from lightning_sr.generation.schedules import DecodeState, FixedSchedule, MemorySchedule, Schedule

__all__ = [
    "SamplingParams",
    "sample_next_token",
    "Schedule",
    "DecodeState",
    "MemorySchedule",
    "FixedSchedule",
    "speculative_rejection",
    "best_of_n",
    "keep_count",
    "select_survivors",
    "DecodeOptions",
    "GenerationResult",
    "GenerationStats",
    "Candidate",
    "StepEvent",
    "Rollout",
    "prefill",
    "StaticKVCache",
    "kv_bytes_per_token",
    "cache_bytes",
    "context_length",
]
