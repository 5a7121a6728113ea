"""What the generation engine hands back: per-step events, candidates, per-prompt results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class StepEvent:
    """One decoding step of a batch, as seen by an observer (memory profiler, progress display).

    Describes the batch after the step's token was appended and any rows were dropped, so
    ``live_rows`` and ``kv_bytes`` describe the cache the next step runs on. On CPU events come
    after every step; on CUDA they come in bursts at each read-back of the rows' state (every
    few steps), each one still describing its own step.
    """

    step: int
    """Tokens generated so far by the rows still live (1 after the first sampled token)."""
    sequence_length: int
    """KV-cache columns written: padded prompt length plus ``step`` (minus one once no row is live)."""
    live_rows: int
    """Rows still decoding after this step."""
    kv_bytes: int
    """Bytes of keys and values the live rows hold: ``live_rows x sequence_length x``
    :func:`~lightning_sr.generation.kv_bytes_per_token`."""
    rejected_rows: int = 0
    """Live rows rejected at a decision point at this step."""
    ended_rows: int = 0
    """Rows that ended at this step without being rejected (EOS or stop token, length limit, or
    no room left in the memory budget)."""
    decision: bool = False
    """Whether a decision point (reward scoring and rejection) happened at this step."""
    round: int = 0
    """Number of decision points passed so far in this batch."""
    num_prompts: int = 0
    """Prompts in the batch being decoded."""
    kv_reserved_bytes: int = 0
    """Bytes allocated for the KV cache (measured on its tensor): the live rows' ``kv_bytes``,
    rows that ended but still hold a slot, and room preallocated for the tokens to come."""


Observer = Callable[[StepEvent], Any]


@dataclass
class Candidate:
    """One sampled response for a prompt."""

    text: str
    token_ids: list[int]
    """Generated ids, without the EOS or stop token that ended the response."""
    reward: float
    """The final score when ``final`` is true, else the last partial score before rejection."""
    eos: bool
    """Ended with an EOS or stop token (False when cut at the length limit or rejected)."""
    final: bool = True
    """The response ended without being rejected and ``reward`` is its final score."""
    rejected_at: int | None = None
    """Generated length at which the candidate was rejected, or None if it was never rejected."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    """Per-prompt statistics of one generation call (a batch of prompts decoded together)."""

    rounds: int = 0
    """Decision points at which this prompt's rows were scored."""
    live_rows_per_round: list[int] = field(default_factory=list)
    """Rows decoding for this prompt at the start and after each decision point."""
    tokens_generated: int = 0
    reward_calls: int = 0
    """Reward-model calls that scored at least one of this prompt's rows."""
    reward_tokens: int = 0
    """Tokens the reward model read for this prompt's rows (when it reports them)."""
    nan_rewards: int = 0
    """Candidates whose final score came back NaN (they rank last)."""
    generation_seconds: float = 0.0
    """The batch's decoding time, shared out in proportion to the tokens each prompt generated."""
    reward_seconds: float = 0.0
    """Each reward call's time, shared out in proportion to the reward tokens of each row scored
    (in equal parts per row when the reward model reports no token counts)."""
    peak_kv_bytes: int = 0
    """Peak of the batch's :attr:`StepEvent.kv_bytes` (keys and values of the live rows)."""
    peak_kv_reserved_bytes: int = 0
    """Peak of the batch's :attr:`StepEvent.kv_reserved_bytes` (the KV cache allocated)."""
    peak_memory_bytes: int | None = None
    """Highest CUDA memory allocated by this process that the call saw (None on CPU): sampled with
    ``torch.cuda.memory_allocated`` after the prefill, at every host read-back and after the final
    reward call. A lower bound on the true peak, since memory allocated and freed between two
    looks (a forward's activations) is missed; the engine does not reset the process-wide peak
    statistics, which are the profiler's. The exact peak of a batch, decoding included, is
    GPUMemoryProfiler's ``peak_allocated_bytes``."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """The answer for one prompt: its best final-scored response, with every candidate."""

    prompt: Any
    response: str
    reward: float
    candidates: list[Candidate]
    stats: GenerationStats

    @property
    def best(self) -> Candidate:
        return best_final(self.candidates)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "reward": self.reward,
            "stats": self.stats.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def rank_key(score: float) -> float:
    """Sort key (descending order by score) that puts NaN last."""
    return -math.inf if math.isnan(score) else score


def best_final(candidates: list[Candidate]) -> Candidate:
    """The highest final-scored candidate; NaN ranks last, ties go to the earliest sampled."""
    finals = [c for c in candidates if c.final]
    return max(finals, key=lambda c: rank_key(c.reward))
