"""The generation engine: Speculative Rejection and Best-of-N over a static, in-place KV cache.

Plain PyTorch + transformers; no Lightning import, so it works from any loop.

These are the names users call: the two entry points, their options and schedules, what they
return and report, and the KV-cache size a budget is made of. The engine's parts (the rollout and
its static cache, the sampler, the survivor selection) are importable from their modules
(``lightning_sr.generation.rollout.prefill``, ``.sampling.sample_next_token``, ``.decision``,
``.cache``, ``.memory``, ``.prompts``).
"""

from lightning_sr.generation.memory import kv_bytes_per_token
from lightning_sr.generation.rejection import best_of_n, speculative_rejection
from lightning_sr.generation.results import Candidate, GenerationResult, GenerationStats, StepEvent
from lightning_sr.generation.rollout import DecodeOptions
from lightning_sr.generation.sampling import SamplingParams
from lightning_sr.generation.schedules import DecodeState, FixedSchedule, MemorySchedule, Schedule

__all__ = [
    "speculative_rejection",
    "best_of_n",
    "SamplingParams",
    "DecodeOptions",
    "Schedule",
    "DecodeState",
    "MemorySchedule",
    "FixedSchedule",
    "GenerationResult",
    "GenerationStats",
    "Candidate",
    "StepEvent",
    "kv_bytes_per_token",
]
