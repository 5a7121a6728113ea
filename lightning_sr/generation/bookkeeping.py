"""The engine's host state and records, kept out of its loop (:mod:`~lightning_sr.generation.rejection`).

Algorithm 1 of Sun et al. (NeurIPS 2024, arXiv 2410.20290) reads and changes the rows' state; the
rest is what a caller wants to see of a call and the algorithm itself never reads:

- :class:`Rows`: the host's view of every row (which are live, their lengths, scores and pools);
- :class:`StepEvents`: one :class:`~lightning_sr.generation.results.StepEvent` per decoding step,
  rebuilt at each read-back from the rows' lengths, and the KV peaks of the statistics;
- :class:`RewardLedger`: every reward call, timed, and how its time and tokens are shared out
  among the prompts' :class:`~lightning_sr.generation.results.GenerationStats`;

and :func:`assemble_results`, which turns them into the call's
:class:`~lightning_sr.generation.results.GenerationResult` list.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from lightning_sr.generation.results import Candidate, GenerationResult, GenerationStats, Observer, StepEvent, best_final
from lightning_sr.rewards.base import RewardModel, checked_scores


class Rows:
    """Host state of every row of a call (rows ``p*n ... p*n+n-1`` for prompt ``p``), one tensor
    per concept.

    ``live`` (still decoding), ended (not live, for any reason), ``eos`` (ended by an EOS or stop
    token), ``length`` (tokens generated, the ending one included), ``final`` (has its final
    score), ``score`` (last score, partial or final; NaN before any), ``rejected_at`` (0, or the
    length at which it was rejected) and ``pool`` (still ranked at decisions: live, or ended and
    never ranked out). The device keeps its own copy of what decoding changes
    (:class:`~lightning_sr.generation.rollout.Rollout`); :meth:`read_back` brings it over.
    """

    def __init__(self, prompts: int, n: int):
        rows = prompts * n
        self.group = torch.arange(rows) // n
        self.live = torch.ones(rows, dtype=torch.bool)
        self.eos = torch.zeros(rows, dtype=torch.bool)
        self.length = torch.zeros(rows, dtype=torch.long)
        self.final = torch.zeros(rows, dtype=torch.bool)
        self.score = torch.full((rows,), math.nan)
        self.rejected_at = torch.zeros(rows, dtype=torch.long)
        self.pool = torch.ones(rows, dtype=torch.bool)

    def __len__(self) -> int:
        return self.group.numel()

    def any_live(self) -> bool:
        return bool(self.live.any())

    def read_back(self, live: torch.Tensor, eos: torch.Tensor, length: torch.Tensor) -> None:
        """Take the device's row state; rows this host already ended (rejected, out of memory)
        stay ended."""
        self.live &= live
        self.eos, self.length = eos, length

    def pending_finals(self) -> torch.Tensor:
        """Rows that ended without being rejected and have no final score yet."""
        return (~self.live & ~self.final & (self.rejected_at == 0)).nonzero().squeeze(1)

    def drop(self, dropped: torch.Tensor, step: int) -> torch.Tensor:
        """Rank ``dropped`` out of their pools; those still live are rejected at ``step`` (and
        returned). Ended rows only leave the pool and keep their final scores."""
        rejected = dropped[self.live[dropped]]
        self.pool[dropped] = False
        self.live[rejected] = False
        self.rejected_at[rejected] = step
        return rejected

    def live_in(self, group: int) -> int:
        return int((self.live & (self.group == group)).sum())


@dataclass(frozen=True)
class Decision:
    """The outcome of one decision point (the schedule's ``should_decide`` was true)."""

    rejected: int
    """Live rows rejected there (0 when no pool could shrink)."""


@dataclass(frozen=True)
class _Before:
    """What the steps read back before the current one saw: the state before its decision."""

    rounds: int
    reserved_bytes: int


class StepEvents:
    """One :class:`StepEvent` per decoding step, sent to the observer at each read-back.

    The host learns of ended rows only at read-backs, so the events of the steps since the last
    one are rebuilt from the rows' lengths (a row that ended at step ``t`` has length ``t``): on
    CUDA they come in bursts. Each describes the batch after its step, ``sequence_length = W + t``
    (``W + t - 1`` once no row is live). The peaks of ``kv_bytes`` and ``kv_reserved_bytes`` are
    kept for :class:`GenerationStats`.
    """

    def __init__(self, width: int, per_token: int, num_prompts: int, rows: int, observer: Observer | None):
        self.width, self.per_token, self.num_prompts, self.observer = width, per_token, num_prompts, observer
        self.emitted, self.live = 0, rows  # last step with an event, live rows after it
        self.peak_kv = self.peak_reserved = 0
        self.before = _Before(rounds=0, reserved_bytes=0)

    def read_back(self, rounds: int, reserved_bytes: int) -> None:
        """At a read-back, before anything is decided: the state the earlier steps had."""
        self.before = _Before(rounds, reserved_bytes)

    def emit(self, step: int, rows: Rows, rounds: int, reserved_bytes: int, decision: Decision | None) -> None:
        """The events of the steps after the last one emitted, up to ``step`` (which carries the
        decision, the rounds and the reserved bytes after it); none after the step where the
        last row ended."""
        rejected = decision.rejected if decision is not None else 0
        ended_at = torch.bincount(rows.length[~rows.live & (rows.rejected_at == 0)], minlength=step + 1).tolist()
        for at in range(self.emitted + 1, step + 1):
            now = at == step
            live = self.live - ended_at[at] - (rejected if now else 0)
            length = self.width + at - (live == 0)
            reserved = reserved_bytes if now else self.before.reserved_bytes
            self.peak_kv = max(self.peak_kv, live * length * self.per_token)
            self.peak_reserved = max(self.peak_reserved, reserved)
            if self.observer is not None:
                self.observer(
                    StepEvent(
                        step=at,
                        sequence_length=length,
                        live_rows=live,
                        kv_bytes=live * length * self.per_token,
                        rejected_rows=rejected if now else 0,
                        ended_rows=ended_at[at],
                        decision=decision is not None and now,
                        round=rounds if now else self.before.rounds,
                        num_prompts=self.num_prompts,
                        kv_reserved_bytes=reserved,
                    )
                )
            self.emitted, self.live = at, live
            if live == 0:
                break


@dataclass(frozen=True)
class _RewardCall:
    seconds: float
    rows: torch.Tensor
    token_counts: list[int] | None
    """Tokens the reward model read per row, when it reports them (``last_token_counts``)."""


class RewardLedger:
    """Every reward call of one engine call: timed alone (the device synchronized around it) and
    charged to the prompts whose rows it scored."""

    def __init__(self, reward: RewardModel, group: torch.Tensor, stats: list[GenerationStats], device: torch.device):
        self.reward, self.group, self.stats, self.device = reward, group, stats, device
        self.calls: list[_RewardCall] = []

    def score(self, rows: torch.Tensor, prompts: Sequence, texts: Sequence[str]) -> list[float]:
        """The reward's scores of ``texts`` (responses of ``rows`` to ``prompts``), recorded."""
        _synchronize(self.device)
        start = time.perf_counter()
        scores = checked_scores(self.reward, prompts, texts)
        _synchronize(self.device)
        counts = getattr(self.reward, "last_token_counts", None)  # optional in the RewardModel protocol
        counts = [int(c) for c in counts] if counts is not None and len(counts) == rows.numel() else None
        self.calls.append(_RewardCall(time.perf_counter() - start, rows, counts))
        groups = self.group[rows].tolist()
        for group, tokens in zip(groups, counts or [0] * rows.numel()):
            self.stats[group].reward_tokens += tokens
        for group in set(groups):
            self.stats[group].reward_calls += 1
        return scores

    @property
    def seconds(self) -> float:
        return sum(call.seconds for call in self.calls)

    def share_seconds(self) -> None:
        """Add each call's time to the prompts it scored: by reward tokens, else by rows."""
        for call in self.calls:
            weights = call.token_counts if call.token_counts and sum(call.token_counts) > 0 else [1] * call.rows.numel()
            for group, weight in zip(self.group[call.rows].tolist(), weights):
                self.stats[group].reward_seconds += call.seconds * weight / sum(weights)


def assemble_results(
    prompts: list,
    rows: Rows,
    ids: list[list[int]],
    texts: list[str],
    stats: list[GenerationStats],
    ledger: RewardLedger,
    events: StepEvents,
    total_seconds: float,
    peak_memory: int | None,
) -> list[GenerationResult]:
    """One result per prompt: its candidates (``ids`` and ``texts`` of every row), the best
    final-scored one, and its statistics completed: tokens generated, NaN final scores, the
    reward time by reward tokens, the rest of ``total_seconds`` by tokens generated, the peaks."""
    candidates: list[list[Candidate]] = [[] for _ in prompts]
    for row, group in enumerate(rows.group.tolist()):
        score, final, rejected_at = float(rows.score[row]), bool(rows.final[row]), int(rows.rejected_at[row]) or None
        candidates[group].append(Candidate(texts[row], ids[row], score, bool(rows.eos[row]), final, rejected_at))
        stats[group].tokens_generated += int(rows.length[row])
        stats[group].nan_rewards += int(final and math.isnan(score))
    ledger.share_seconds()
    generation_seconds = max(0.0, total_seconds - ledger.seconds)
    total_tokens = sum(s.tokens_generated for s in stats) or 1
    results = []
    for prompt, pool, s in zip(prompts, candidates, stats):
        s.generation_seconds = generation_seconds * s.tokens_generated / total_tokens
        s.peak_kv_bytes, s.peak_kv_reserved_bytes = events.peak_kv, events.peak_reserved
        s.peak_memory_bytes = peak_memory
        best = best_final(pool)
        results.append(GenerationResult(prompt, best.text, best.reward, pool, s))
    return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
