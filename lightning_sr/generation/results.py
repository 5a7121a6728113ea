"""What the generation engine hands back: per-step events, candidates, per-prompt results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class StepEvent:
    """One decoding step of a batch, as seen by an observer (memory profiler, progress display).

    Emitted after the step's token was appended and any rows were dropped, so ``live_rows`` and
    ``kv_bytes`` describe the cache the next step will run on.
    """

    step: int
    """Tokens generated so far by the rows still alive (1 after the first sampled token)."""
    sequence_length: int
    """Length of the KV cache: padded prompt length plus ``step``."""
    live_rows: int
    """Rows still decoding after this step."""
    kv_bytes: int
    """Bytes held by the KV cache after this step (measured on the cache tensors)."""
    rejected_rows: int = 0
    """Rows dropped by a rejection decision at this step (0 when no decision happened)."""
    finished_rows: int = 0
    """Rows that ended at this step (EOS, ``max_new_tokens`` or the model's context)."""
    decision: bool = False
    """Whether a decision point (reward scoring and rejection) happened at this step."""
    round: int = 0
    """Number of decision points passed so far in this batch."""
    num_prompts: int = 0
    """Prompts in the batch being decoded."""


Observer = Callable[[StepEvent], Any]


@dataclass
class Candidate:
    """One sampled response for a prompt."""

    text: str
    token_ids: list[int]
    reward: float
    """The final score when ``final`` is true, else the last partial score before rejection."""
    finished: bool
    """Ended with an EOS / stop token (False when cut at ``max_new_tokens`` or rejected)."""
    final: bool = True
    """The response is complete (EOS or length limit) and ``reward`` is its final score."""
    rejected_at: int | None = None
    """Generated length at which the candidate was rejected, or None if it was never rejected."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    """Per-prompt statistics. Seconds are the batch's wall time shared out in proportion to tokens."""

    rounds: int = 0
    """Decision points at which this prompt's rows were scored."""
    live_rows_per_round: list[int] = field(default_factory=list)
    """Rows decoding for this prompt at the start and after each decision point."""
    tokens_generated: int = 0
    reward_calls: int = 0
    reward_tokens: int = 0
    nan_rewards: int = 0
    """Candidates whose final score came back NaN (they rank last)."""
    generation_seconds: float = 0.0
    reward_seconds: float = 0.0
    peak_kv_bytes: int = 0
    """Peak KV-cache bytes of the batch this prompt was decoded in."""
    peak_memory_bytes: int | None = None
    """Peak CUDA memory allocated during the call (None on CPU)."""

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
