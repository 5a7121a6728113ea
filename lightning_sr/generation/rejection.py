"""Speculative Rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290) and Best-of-N on one engine.

All rows of all prompts decode together. At a decision point the partial responses are scored by
the reward model and, within each prompt's group, only the best
``max(1, ceil((1 - alpha) x group size))`` rows survive (the paper's Algorithm 1 with its
quantile cut written as a top-k). Finished rows of the group take part in the ranking with their
final scores. The answer for each prompt is its best *final-scored* response. ``alpha = 0`` never
rejects: that is Best-of-N, so both methods are compared on the same engine.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lightning_sr.generation.memory import kv_bytes_per_token
from lightning_sr.generation.prompts import Prompt, encode_prompts, stop_token_ids
from lightning_sr.generation.results import (
    Candidate,
    GenerationResult,
    GenerationStats,
    Observer,
    StepEvent,
    best_final,
    rank_key,
)
from lightning_sr.generation.rollout import Rollout, prefill
from lightning_sr.generation.sampling import SamplingParams, sample_next_token
from lightning_sr.generation.schedules import FixedSchedule, MemorySchedule, Schedule
from lightning_sr.rewards.base import RewardModel, checked_scores


def speculative_rejection(
    model,
    tokenizer,
    reward: RewardModel,
    prompts: Sequence[Prompt],
    *,
    n: int | str = 8,
    alpha: float = 0.5,
    schedule: Schedule | None = None,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    observer: Observer | None = None,
    chat_template: bool = True,
) -> list[GenerationResult]:
    """Sample ``n`` responses per prompt, rejecting the weakest ``alpha`` at each decision point.

    Args:
        model: a transformers causal LM (its device and dtype are used as they are).
        tokenizer: the generator's tokenizer; its chat template is applied when it has one and
            ``chat_template`` is true.
        reward: a :class:`~lightning_sr.rewards.RewardModel`.
        prompts: strings or chat message lists, decoded together in one batch.
        n: samples per prompt, or ``"auto"``: as many as the memory budget allows while still
            reaching ``min_tokens`` (needs a :class:`MemorySchedule`).
        alpha: fraction rejected at each decision point, in [0, 1). 0 is Best-of-N.
        schedule: :class:`MemorySchedule` (default; the paper's) or :class:`FixedSchedule`.
            Ignored when ``alpha == 0``.
        sampling: :class:`SamplingParams`.
        seed: seed of the sampling generator; the same seed gives the same samples.
        observer: called with a :class:`StepEvent` after every decoding step.

    Returns:
        One :class:`GenerationResult` per prompt, in order.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    sampling = sampling or SamplingParams()
    schedule = MemorySchedule() if schedule is None else schedule
    if not isinstance(schedule, (MemorySchedule, FixedSchedule)):
        raise TypeError(f"schedule must be a MemorySchedule or a FixedSchedule, got {type(schedule).__name__}")
    if isinstance(prompts, (str, dict)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or chat message lists")
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or 'auto', got {n!r}")
    if n == "auto" and (alpha == 0 or not isinstance(schedule, MemorySchedule)):
        raise ValueError(
            "n='auto' sizes n from the memory budget, which only rejection keeps: it needs alpha > 0 "
            "and a MemorySchedule (Best-of-N keeps every row to the end: give n)"
        )

    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    limits = _row_limits(model, prompt_ids, sampling.max_new_tokens)
    budget, per_token = None, kv_bytes_per_token(model.config, _cache_dtype(model))
    if isinstance(schedule, MemorySchedule) and (alpha > 0 or n == "auto"):
        budget = schedule.resolve_budget(model.device)
        n = _fit_n(n, budget, per_token, prompt_ids, min(schedule.min_tokens, sampling.max_new_tokens))
    if alpha == 0:
        schedule, budget = FixedSchedule([]), None
    run = _Run(
        model=model,
        tokenizer=tokenizer,
        reward=reward,
        prompts=list(prompts),
        n=n,
        alpha=alpha,
        schedule=schedule,
        budget=budget,
        per_token=per_token,
        sampling=sampling,
        eos_ids=stop_token_ids(model, tokenizer, sampling.stop_token_ids),
        observer=observer,
    )
    with torch.inference_mode():
        return run.generate(prompt_ids, limits, seed)


def best_of_n(
    model,
    tokenizer,
    reward: RewardModel,
    prompts: Sequence[Prompt],
    *,
    n: int = 8,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    observer: Observer | None = None,
    chat_template: bool = True,
) -> list[GenerationResult]:
    """Best-of-N: sample ``n`` complete responses per prompt and keep the best-scored one.

    Exactly :func:`speculative_rejection` with ``alpha=0``: same engine, same samples for a seed.
    """
    return speculative_rejection(
        model,
        tokenizer,
        reward,
        prompts,
        n=n,
        alpha=0.0,
        schedule=FixedSchedule([]),
        sampling=sampling,
        seed=seed,
        observer=observer,
        chat_template=chat_template,
    )


def _cache_dtype(model) -> torch.dtype:
    """The dtype the KV cache will be stored in: autocast's when it is on (mixed precision)."""
    device_type = model.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.dtype


def keep_count(group_size: int, alpha: float) -> int:
    """Rows a group keeps at a decision point: ``max(1, ceil((1 - alpha) x group size))``."""
    return max(1, math.ceil((1.0 - alpha) * group_size - 1e-9))


def _row_limits(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Tokens each prompt's rows may generate: ``max_new_tokens`` or what the context leaves."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limits = []
    for index, ids in enumerate(prompt_ids):
        if context is not None and len(ids) >= context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens, which leaves no room in the generator's "
                f"context of {context} tokens"
            )
        limits.append(max_new_tokens if context is None else min(max_new_tokens, context - len(ids)))
    return limits


def _fit_n(n, budget: int, per_token: int, prompt_ids: list[list[int]], min_tokens: int) -> int:
    """Check (or, for ``n='auto'``, choose) n so every row reaches ``min_tokens`` in the budget.

    Before the first possible decision the cache grows to ``rows x (prompt + min_tokens - 1)``
    tokens: the token sampled at ``min_tokens`` enters the cache only after the decision.
    """
    per_row = (max(len(ids) for ids in prompt_ids) + min_tokens - 1) * per_token
    fits = budget // (per_row * len(prompt_ids))
    if n == "auto":
        if fits < 1:
            raise ValueError(
                f"the memory budget of {budget} bytes cannot hold even one row per prompt for "
                f"{min_tokens} tokens ({per_row} bytes per row, {len(prompt_ids)} prompts): raise "
                "the budget, lower min_tokens or send fewer prompts per batch"
            )
        return int(fits)
    if n > fits:
        raise ValueError(
            f"n={n} rows per prompt need {n * per_row * len(prompt_ids)} bytes of KV cache to reach "
            f"min_tokens={min_tokens}, but the memory budget is {budget} bytes: use n<={fits}, "
            "n='auto', or a larger budget"
        )
    return n


@dataclass
class _Row:
    """Bookkeeping of one sampled response (one row of the batch)."""

    group: int
    length: int = 0
    stopped: bool = False
    ended: bool = False
    rejected_at: int | None = None
    score: float = float("nan")
    scored_final: bool = False
    scored_at: int = 0  # step of the last partial score
    in_pool: bool = True


class _Run:
    """One call of the engine: the batch's rows, their scores and the per-prompt statistics."""

    def __init__(self, model, tokenizer, reward, prompts, n, alpha, schedule, budget, per_token, sampling, eos_ids, observer):
        self.model, self.tokenizer, self.reward, self.prompts = model, tokenizer, reward, prompts
        self.n, self.alpha, self.schedule, self.budget, self.per_token = n, alpha, schedule, budget, per_token
        self.sampling, self.eos_ids, self.observer = sampling, eos_ids, observer
        self.device = model.device
        self.rows = [_Row(group=r // n) for r in range(len(prompts) * n)]
        self.stats = [GenerationStats(live_rows_per_round=[n]) for _ in prompts]
        self.pending: list[int] = []  # ended rows waiting for their final score
        self.reward_calls: list[tuple[float, list[int]]] = []  # (seconds, rows scored)
        self.rounds = 0
        self.last_decision = 0
        self.group_decided_at: dict[int, int] = {}
        self.peak_kv = 0

    def generate(self, prompt_ids: list[list[int]], limits: list[int], seed: int) -> list[GenerationResult]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rollout = prefill(self.model, prompt_ids, self.n, pad_id)
        self.peak_kv = rollout.kv_bytes
        row_limit = torch.tensor(limits, device=self.device).repeat_interleave(self.n)
        self.tokens = torch.zeros(len(self.rows), max(limits), dtype=torch.long, device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)

        step = 0
        while rollout.num_rows:
            step += 1
            next_tokens = sample_next_token(rollout.logits, self.sampling, generator)
            self.tokens[rollout.row_ids, step - 1] = next_tokens
            stopped = torch.isin(next_tokens, eos)
            ended = stopped | (step >= row_limit[rollout.row_ids])
            alive = ~ended
            ended_rows = rollout.row_ids[ended].tolist()
            for row, stop in zip(ended_rows, stopped[ended].tolist()):
                self._end_row(row, step, stop)
            live = rollout.num_rows - len(ended_rows)

            decision = self._is_decision(step, rollout, live)
            rejected = 0
            while decision:
                shrank, dropped = self._decide(step, rollout, alive)
                rejected += dropped
                live -= dropped
                if not self._over_budget(rollout, live):
                    break
                if not shrank:  # every pool is down to one row and still no room
                    self._stop_for_budget(step, rollout, alive)
                    live = 0
                    break
            if live < rollout.num_rows:  # only then is there anything to drop
                rollout.keep(alive.nonzero().squeeze(1))
                next_tokens = next_tokens[alive]
            if live:
                rollout.step(next_tokens)
            kv_bytes = rollout.kv_bytes if rollout.num_rows else 0
            self.peak_kv = max(self.peak_kv, kv_bytes)
            if self.observer is not None:
                self.observer(
                    StepEvent(
                        step=step,
                        sequence_length=rollout.sequence_length,
                        live_rows=rollout.num_rows,
                        kv_bytes=kv_bytes,
                        rejected_rows=rejected,
                        finished_rows=len(ended_rows),
                        decision=decision,
                        round=self.rounds,
                        num_prompts=len(self.prompts),
                    )
                )
        self._score(self.pending, partial_rows=[])
        return self._results(time.perf_counter() - start)

    def _end_row(self, row: int, step: int, stopped: bool) -> None:
        state = self.rows[row]
        state.length, state.stopped, state.ended = step, stopped, True
        self.pending.append(row)

    def _over_budget(self, rollout: Rollout, live: int) -> bool:
        """Would one more token for each of the ``live`` rows push the KV cache past the budget?"""
        if self.budget is None:
            return False
        return live * (rollout.sequence_length + 1) * self.per_token > self.budget

    def _is_decision(self, step: int, rollout: Rollout, live: int) -> bool:
        if self.alpha == 0 or live == 0:
            return False
        if isinstance(self.schedule, FixedSchedule):
            return step in self.schedule.lengths
        return step >= self.schedule.min_tokens and self._over_budget(rollout, live)

    def _decide(self, step: int, rollout: Rollout, alive: torch.Tensor) -> tuple[bool, int]:
        """Score the pools that must shrink and reject their weakest rows (``alive`` is updated).

        A pool is a prompt's live rows plus its ended rows not yet rejected (those rank with their
        final scores). Under a memory budget this may run again at the same step until the rows
        fit; partial responses already scored at this step are not scored again. Returns whether
        any pool shrank and how many live rows were rejected.
        """
        live_rows = set(rollout.row_ids[alive].tolist())
        for row in live_rows:
            self.rows[row].length = step
        pools: dict[int, list[int]] = {}
        for row, state in enumerate(self.rows):
            if state.in_pool and (state.ended or row in live_rows):
                pools.setdefault(state.group, []).append(row)
        shrinking = {g: rows for g, rows in pools.items() if keep_count(len(rows), self.alpha) < len(rows)}
        if not shrinking:
            return False, 0
        first_pass = self.last_decision != step
        self.last_decision = step
        self.rounds += first_pass
        partial = [
            row for rows in shrinking.values() for row in rows if not self.rows[row].ended and self.rows[row].scored_at != step
        ]
        for row in partial:
            self.rows[row].scored_at = step
        self._score(self.pending, partial_rows=partial)
        rejected = set()
        for group, rows in shrinking.items():
            ranked = sorted(rows, key=lambda row: (-rank_key(self.rows[row].score), row))
            for row in ranked[keep_count(len(rows), self.alpha) :]:
                self.rows[row].in_pool = False
                if row in live_rows:
                    self.rows[row].rejected_at = step
                    rejected.add(row)
            stats = self.stats[group]
            survivors = len([r for r in rows if r in live_rows and r not in rejected])
            if self.group_decided_at.get(group) == step:  # a further pass at the same decision point
                stats.live_rows_per_round[-1] = survivors
            else:
                self.group_decided_at[group] = step
                stats.rounds += 1
                stats.live_rows_per_round.append(survivors)
        if rejected:
            dropped = torch.tensor([row in rejected for row in rollout.row_ids.tolist()], device=alive.device)
            alive &= ~dropped
        return True, len(rejected)

    def _stop_for_budget(self, step: int, rollout: Rollout, alive: torch.Tensor) -> None:
        """No rejection can make room: the live rows end here and are scored as they are."""
        live_rows = rollout.row_ids[alive].tolist()
        warnings.warn(
            f"the memory budget of {self.budget} bytes cannot hold one more token for the "
            f"{len(live_rows)} rows left after rejecting at {step} tokens: they stop here and are "
            "scored as they are (raise the budget or lower n)",
            stacklevel=4,
        )
        for row in live_rows:
            self._end_row(row, step, stopped=False)
        alive.zero_()

    def _response_ids(self, rows: list[int]) -> list[list[int]]:
        """Generated ids of each row, without the stop token that ended it."""
        ids = self.tokens[rows].tolist()
        return [row_ids[: self.rows[row].length - self.rows[row].stopped] for row, row_ids in zip(rows, ids)]

    def _score(self, final_rows: list[int], partial_rows: list[int]) -> None:
        """One reward call: final scores for ended rows, partial scores for live ones."""
        rows = list(final_rows) + list(partial_rows)
        if not rows:
            return
        texts = self.tokenizer.batch_decode(self._response_ids(rows), skip_special_tokens=True)
        prompts = [self.prompts[self.rows[row].group] for row in rows]
        _synchronize(self.device)
        start = time.perf_counter()
        scores = checked_scores(self.reward, prompts, texts)
        _synchronize(self.device)
        self.reward_calls.append((time.perf_counter() - start, rows))
        counts = getattr(self.reward, "last_token_counts", None)
        counts = counts if counts is not None and len(counts) == len(rows) else [0] * len(rows)
        for row, score, tokens in zip(rows, scores, counts):
            state = self.rows[row]
            state.score = score
            state.scored_final = state.ended
            self.stats[state.group].reward_tokens += int(tokens)
        for group in {self.rows[row].group for row in rows}:
            self.stats[group].reward_calls += 1
        self.pending = []

    def _results(self, total_seconds: float) -> list[GenerationResult]:
        reward_seconds = sum(seconds for seconds, _ in self.reward_calls)
        generation_seconds = max(0.0, total_seconds - reward_seconds)
        peak_memory = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        all_rows = list(range(len(self.rows)))
        ids = self._response_ids(all_rows)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        candidates: list[list[Candidate]] = [[] for _ in self.prompts]
        for row, state in enumerate(self.rows):
            candidates[state.group].append(
                Candidate(texts[row], ids[row], state.score, state.stopped, state.scored_final, state.rejected_at)
            )
            self.stats[state.group].tokens_generated += state.length
            self.stats[state.group].nan_rewards += int(state.scored_final and math.isnan(state.score))
        total_tokens = sum(stats.tokens_generated for stats in self.stats) or 1
        for seconds, rows in self.reward_calls:
            for row in rows:
                self.stats[self.rows[row].group].reward_seconds += seconds / len(rows)
        results = []
        for group, prompt in enumerate(self.prompts):
            stats = self.stats[group]
            stats.generation_seconds = generation_seconds * stats.tokens_generated / total_tokens
            stats.peak_kv_bytes = self.peak_kv
            stats.peak_memory_bytes = peak_memory
            best = best_final(candidates[group])
            results.append(GenerationResult(prompt, best.text, best.reward, candidates[group], stats))
        return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
