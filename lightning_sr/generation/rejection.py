"""Speculative Rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290) and Best-of-N on one engine.

Algorithm 1 of the paper, with every sample of every prompt in one batch: prefill each prompt
once, then sample a token for every row, mark the rows it ended, and at a decision point (chosen
by the :class:`~lightning_sr.generation.schedules.Schedule`) score the partial responses and keep
the best of each prompt's pool (:func:`~lightning_sr.generation.decision.select_survivors`). The
answer for each prompt is its best *final-scored* response. ``alpha = 0`` never rejects: that is
Best-of-N, so both methods are compared on the same engine, with the same samples for a seed.

Row state is a handful of host tensors over every row, one name per concept: ``live`` (still
decoding), ended (not live, for any reason), ``eos`` (ended by an EOS or stop token), ``final``
(has its final score), ``rejected_at`` (0 or the length at which it was rejected) and ``pool``
(still ranked at decisions: live, or ended and never ranked out). The device keeps its own copy of
what decoding changes (:class:`~lightning_sr.generation.rollout.Rollout`), read back every step on
CPU and every few steps on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Sequence

import torch

from lightning_sr.generation.decision import _keep_counts, select_survivors
from lightning_sr.generation.memory import kv_bytes_per_token
from lightning_sr.generation.prompts import Prompt, encode_prompts, row_limits, stop_token_ids
from lightning_sr.generation.results import (
    Candidate,
    GenerationResult,
    GenerationStats,
    Observer,
    StepEvent,
    best_final,
)
from lightning_sr.generation.rollout import DecodeOptions, Rollout, _sync_debug_mode, prefill
from lightning_sr.generation.sampling import SamplingParams, sample_next_token
from lightning_sr.generation.schedules import DecodeState, FixedSchedule, Schedule, as_schedule
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
    options: DecodeOptions | None = None,
) -> list[GenerationResult]:
    """Sample ``n`` responses per prompt, rejecting the weakest ``alpha`` at each decision point.

    Args:
        model: a transformers causal LM (its device and dtype are used as they are).
        tokenizer: the generator's tokenizer; its chat template is applied when it has one and
            ``chat_template`` is true.
        reward: a :class:`~lightning_sr.rewards.RewardModel`.
        prompts: strings or chat message lists, decoded together in one batch.
        n: samples per prompt, or ``"auto"``: as many as the schedule's memory budget allows
            while still reaching ``min_tokens`` (needs a schedule with a budget).
        alpha: fraction rejected at each decision point, in [0, 1). 0 is Best-of-N.
        schedule: any :class:`~lightning_sr.generation.Schedule`; default
            :class:`MemorySchedule` (the paper's). Ignored when ``alpha == 0``.
        sampling: :class:`SamplingParams`.
        seed: seed of the sampling generator; the same seed gives the same samples.
        observer: called with a :class:`StepEvent` for every decoding step.
        options: :class:`DecodeOptions` (read-back cadence, CUDA graphs).

    Returns:
        One :class:`GenerationResult` per prompt, in order.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    sampling = sampling or SamplingParams()
    schedule = as_schedule(schedule)
    if isinstance(prompts, (str, dict)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or chat message lists")
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or 'auto', got {n!r}")
    auto_error = ValueError(
        "n='auto' sizes n from the memory budget, which only rejection keeps: it needs alpha > 0 "
        "and a MemorySchedule (or another schedule with a kv_budget); Best-of-N keeps every row "
        "to the end: give n"
    )
    if n == "auto" and alpha == 0:
        raise auto_error

    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    limits = row_limits(model.config, prompt_ids, sampling.max_new_tokens)
    per_token = kv_bytes_per_token(model.config, _cache_dtype(model))
    budget = None if alpha == 0 else schedule.kv_budget(model.device)
    if n == "auto" and budget is None:
        raise auto_error
    if budget is not None:
        min_tokens = min(getattr(schedule, "min_tokens", 1), max(limits))
        n = _fit_n(n, budget, per_token, prompt_ids, min_tokens)
    run = _Run(
        model=model,
        tokenizer=tokenizer,
        reward=reward,
        prompts=list(prompts),
        n=n,
        alpha=alpha,
        schedule=schedule if alpha > 0 else None,
        budget=budget,
        per_token=per_token,
        sampling=sampling,
        eos_ids=stop_token_ids(model, tokenizer, sampling.stop_token_ids),
        observer=observer,
        options=options or DecodeOptions(),
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
    options: DecodeOptions | None = None,
) -> list[GenerationResult]:
    """Best-of-N: sample ``n`` complete responses per prompt and keep the best-scored one.

    Exactly :func:`speculative_rejection` with ``alpha=0``: same engine, same samples for a seed.
    The KV cache is sized once, to the prompts plus ``max_new_tokens``.
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
        options=options,
    )


def _cache_dtype(model) -> torch.dtype:
    """The dtype the KV cache will be stored in: autocast's when it is on (mixed precision)."""
    device_type = model.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.dtype


def _fit_n(n, budget: int, per_token: int, prompt_ids: list[list[int]], min_tokens: int) -> int:
    """Check (or, for ``n='auto'``, choose) n so every row reaches ``min_tokens`` in the budget.

    Before the first possible decision the cache grows to ``rows x (prompt + min_tokens - 1)``
    tokens: the token sampled at ``min_tokens`` enters the cache only after the decision.
    """
    prompts = len(prompt_ids)
    per_row = (max(len(ids) for ids in prompt_ids) + min_tokens - 1) * per_token
    fits = budget // (per_row * prompts)
    if fits < 1:
        raise ValueError(
            f"the memory budget of {budget} bytes cannot hold one row per prompt for {min_tokens} "
            f"tokens: {prompts} prompts need at least {per_row * prompts} bytes ({per_row} per row); "
            "raise the budget, lower min_tokens or send fewer prompts per batch"
        )
    if n == "auto":
        return int(fits)
    if n > fits:
        raise ValueError(
            f"n={n} rows per prompt need {n * per_row * prompts} bytes of KV cache to reach "
            f"min_tokens={min_tokens}, but the memory budget is {budget} bytes: it fits n<={fits} "
            f"(or use n='auto', or a budget of at least {n * per_row * prompts} bytes)"
        )
    return n


class _Run:
    """One call of the engine: the rows, their scores and the per-prompt statistics."""

    def __init__(self, model, tokenizer, reward, prompts, n, alpha, schedule, budget, per_token, sampling, eos_ids, observer, options):
        self.model, self.tokenizer, self.reward, self.prompts = model, tokenizer, reward, prompts
        self.n, self.alpha, self.schedule, self.per_token = n, alpha, schedule, per_token
        self.budget_tokens = None if budget is None else budget // per_token
        self.budget, self.sampling, self.eos_ids, self.observer = budget, sampling, eos_ids, observer
        self.options = options
        self.device = model.device
        rows = len(prompts) * n
        self.group = torch.arange(rows) // n
        self.live = torch.ones(rows, dtype=torch.bool)
        self.eos = torch.zeros(rows, dtype=torch.bool)
        self.length = torch.zeros(rows, dtype=torch.long)
        self.final = torch.zeros(rows, dtype=torch.bool)
        self.score = torch.full((rows,), math.nan)
        self.rejected_at = torch.zeros(rows, dtype=torch.long)
        self.pool = torch.ones(rows, dtype=torch.bool)
        self.stats = [GenerationStats(live_rows_per_round=[n]) for _ in prompts]
        self.reward_calls: list[tuple[float, torch.Tensor, list[int] | None]] = []
        self.rounds = 0
        self.window: dict = {}
        self.check_at: int | None = None
        self.emitted, self.live_emitted = 0, rows  # last step with an event, live rows after it
        self.peak_kv = self.peak_reserved = 0

    def generate(self, prompt_ids: list[list[int]], limits: list[int], seed: int) -> list[GenerationResult]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.width, self.max_limit = max(len(ids) for ids in prompt_ids), max(limits)
        if self.schedule is not None:
            self.check_at = self._next_check(0, self.width)
        rows = len(self.group)
        capacity = self._capacity(rows)
        arena = rows * capacity
        if self.budget_tokens is not None:  # every later round fits in the first allocation
            arena = max(arena, min(self.budget_tokens, rows * (self.width + self.max_limit - 1)))
        self.rollout = prefill(
            self.model, prompt_ids, self.n, pad_id, limits=limits, capacity=capacity, arena_tokens=arena,
            eos_ids=self.eos_ids, dtype=_cache_dtype(self.model), options=self.options,
        )  # fmt: skip
        self._decode(self.rollout, generator)
        self._score(final_rows=self._pending_finals(), partial_rows=torch.zeros(0, dtype=torch.long))
        return self._results(time.perf_counter() - start)

    def _decode(self, rollout: Rollout, generator: torch.Generator) -> None:
        """Algorithm 1 of the paper, one generated token per iteration."""
        step = 0
        with self._no_syncs():  # with DecodeOptions(debug_syncs=True) a host sync here raises
            while True:
                step += 1
                tokens = sample_next_token(rollout.logits, self.sampling, generator)
                rollout.mark(tokens, step)  # rows ended by EOS, stop ids or length: on the device
                if self._must_read_back(step, rollout):
                    with _sync_debug_mode("default"):
                        self._read_back(rollout, step)
                        checked = self._is_check(step, rollout)
                        if checked and self.live.any() and self.schedule.should_decide(self._state(step)):
                            self._reject(step)  # score the partial responses, keep each pool's best
                        self._next_round(rollout, step, checked)  # compact, size the cache, emit events
                        if not self.live.any():
                            return
                rollout.step()  # append the sampled tokens of the slots left

    # ------------------------------------------------------------------ when to look, what to do

    def _no_syncs(self):
        debug = self.options.debug_syncs and self.device.type == "cuda"
        return _sync_debug_mode("error") if debug else contextlib.nullcontext()

    def _must_read_back(self, step: int, rollout: Rollout) -> bool:
        """Every step on CPU; on CUDA every ``sync_every`` steps, at checks and at a round's end."""
        return (
            self.device.type != "cuda"
            or step % self.options.sync_every == 0
            or step == self.check_at
            or rollout.sequence_length >= rollout.capacity
            or step >= self.max_limit
        )

    def _is_check(self, step: int, rollout: Rollout) -> bool:
        """The schedule is asked at the step it named and whenever the round's cache is full."""
        return self.schedule is not None and (step == self.check_at or rollout.sequence_length >= rollout.capacity)

    def _read_back(self, rollout: Rollout, step: int) -> None:
        live, eos, length = rollout.read_back()
        self.live &= live  # rows this host already ended (rejected, out of memory) stay ended
        self.eos, self.length = eos, length
        # What the events of the steps since the last read-back need: their state before this step's decision.
        self.window = {"rounds": self.rounds, "reserved": rollout.cache.reserved_bytes, "decided": False, "rejected": 0}

    def _state(self, step: int) -> DecodeState:
        return DecodeState(
            step=step,
            sequence_length=self.width + step - 1,
            live_rows=int(self.live.sum()),
            num_prompts=len(self.prompts),
            kv_bytes_per_token=self.per_token,
            kv_budget_bytes=self.budget,
        )

    def _next_check(self, step: int, sequence_length: int) -> int | None:
        state = DecodeState(step, sequence_length, int(self.live.sum()), len(self.prompts), self.per_token, self.budget)
        check = self.schedule.next_check(state)
        if check is not None and check <= step:
            raise ValueError(f"{type(self.schedule).__name__}.next_check returned {check} at step {step}: it must be later")
        return check

    def _capacity(self, rows: int) -> int:
        """Columns of the next round: to the next check (or the last token), within the budget."""
        end = self.max_limit if self.check_at is None else min(self.check_at, self.max_limit)
        columns = self.width + end - 1  # the token sampled at `end` enters the cache after the check
        if self.budget_tokens is not None:
            columns = min(columns, self.budget_tokens // max(rows, 1))
        return columns

    def _reject(self, step: int) -> None:
        """One decision point: score the pools that shrink, keep the best rows of each (Alg. 1).

        The rows that still fit in the budget, ``budget // (columns after this token)``, cap the
        live survivors (see :func:`select_survivors`).
        """
        pooled = self.pool.nonzero().squeeze(1)
        groups = self.group[pooled]
        sizes = torch.bincount(groups, minlength=len(self.prompts))
        shrinking = (_keep_counts(sizes, self.alpha) < sizes).nonzero().squeeze(1)
        self.window["decided"] = True
        if shrinking.numel() == 0:
            return
        self.rounds += 1
        partial = pooled[torch.isin(groups, shrinking) & self.live[pooled]]
        self._score(final_rows=self._pending_finals(), partial_rows=partial)
        columns = self.width + step  # after the token sampled at this step is appended
        max_live = None if self.budget_tokens is None else self.budget_tokens // columns
        keep = select_survivors(self.score[pooled], groups, ~self.live[pooled], self.alpha, max_live)
        dropped = pooled[~keep]
        rejected = dropped[self.live[dropped]]
        self.pool[dropped] = False
        self.live[rejected] = False
        self.rejected_at[rejected] = step
        self.rollout.end(rejected)
        for group in shrinking.tolist():
            self.stats[group].rounds += 1
            self.stats[group].live_rows_per_round.append(int((self.live & (self.group == group)).sum()))
        self.window["rejected"] = int(rejected.numel())

    def _stop_rows_that_cannot_fit(self, step: int) -> None:
        """No rejection made room for one more token: the live rows end here, scored as they are."""
        live = self.live.nonzero().squeeze(1)
        if self.budget_tokens is None or live.numel() * (self.width + step) <= self.budget_tokens:
            return
        warnings.warn(
            f"the memory budget of {self.budget} bytes cannot hold one more token for the "
            f"{live.numel()} rows left at {step} tokens: they stop here and are scored as they are "
            "(raise the budget or lower n)",
            stacklevel=5,
        )
        self.live[live] = False
        self.rollout.end(live)

    def _next_round(self, rollout: Rollout, step: int, checked: bool) -> None:
        """Stop the rows the budget cannot hold, compact the batch to its live rows and size the
        cache for the next round when needed, then emit the events of the steps read back.

        The batch is compacted at a check (a decision, or a full cache) and when few rows are left
        decoding (looked at every ``sync_every`` steps, so CPU and CUDA compact alike), never
        otherwise.
        """
        self._stop_rows_that_cannot_fit(step)
        if self.live.any():
            if checked:
                self.check_at = self._next_check(step, self.width + step - 1)
            live = self.live[rollout.slot_rows].nonzero().squeeze(1)  # slots of the live rows
            few_left = step % self.options.sync_every == 0 and live.numel() < self.options.compact_below * rollout.num_slots
            if checked or few_left or rollout.sequence_length >= rollout.capacity:
                rollout.resize(live, max(self._capacity(live.numel()), self.width + step))
        self._emit_events(step)

    # ------------------------------------------------------------------ scores and events

    def _pending_finals(self) -> torch.Tensor:
        """Rows that ended without being rejected and have no final score yet."""
        return (~self.live & ~self.final & (self.rejected_at == 0)).nonzero().squeeze(1)

    def _response_ids(self, rows: torch.Tensor) -> list[list[int]]:
        """Generated ids of each row, without the EOS or stop token that ended it."""
        ids = self.rollout.tokens[rows.to(self.device)].tolist()
        ends = (self.length[rows] - self.eos[rows].long()).tolist()
        return [row_ids[:end] for row_ids, end in zip(ids, ends)]

    def _score(self, final_rows: torch.Tensor, partial_rows: torch.Tensor) -> None:
        """One reward call: final scores for ended rows, partial scores for live ones."""
        rows = torch.cat([final_rows, partial_rows])
        if rows.numel() == 0:
            return
        texts = self.tokenizer.batch_decode(self._response_ids(rows), skip_special_tokens=True)
        prompts = [self.prompts[group] for group in self.group[rows].tolist()]
        _synchronize(self.device)
        start = time.perf_counter()
        scores = checked_scores(self.reward, prompts, texts)
        _synchronize(self.device)
        counts = getattr(self.reward, "last_token_counts", None)
        counts = [int(c) for c in counts] if counts is not None and len(counts) == rows.numel() else None
        self.reward_calls.append((time.perf_counter() - start, rows, counts))
        self.score[rows] = torch.tensor(scores, dtype=self.score.dtype)
        self.final[final_rows] = True
        for group, tokens in zip(self.group[rows].tolist(), counts or [0] * rows.numel()):
            self.stats[group].reward_tokens += tokens
        for group in set(self.group[rows].tolist()):
            self.stats[group].reward_calls += 1

    def _emit_events(self, step: int) -> None:
        """One :class:`StepEvent` per step since the last read-back, rebuilt from the rows' lengths."""
        window = self.window
        decided, rejected, reserved, rounds = window["decided"], window["rejected"], window["reserved"], window["rounds"]
        ended = self.length[~self.live & (self.rejected_at == 0)]
        ended_at = torch.bincount(ended, minlength=step + 1).tolist()
        for at in range(self.emitted + 1, step + 1):
            now = at == step
            drop = ended_at[at] + (rejected if now else 0)
            live = self.live_emitted - drop
            length = self.width + at - (live == 0)
            self.peak_kv = max(self.peak_kv, live * length * self.per_token)
            reserved_now = self.rollout.cache.reserved_bytes if now else reserved
            self.peak_reserved = max(self.peak_reserved, reserved_now)
            if self.observer is not None:
                self.observer(
                    StepEvent(
                        step=at,
                        sequence_length=length,
                        live_rows=live,
                        kv_bytes=live * length * self.per_token,
                        rejected_rows=rejected if now else 0,
                        ended_rows=ended_at[at],
                        decision=decided and now,
                        round=self.rounds if now else rounds,
                        num_prompts=len(self.prompts),
                        kv_reserved_bytes=reserved_now,
                    )
                )
            self.emitted, self.live_emitted = at, live
            if live == 0:
                break

    def _results(self, total_seconds: float) -> list[GenerationResult]:
        reward_seconds = sum(seconds for seconds, _, _ in self.reward_calls)
        generation_seconds = max(0.0, total_seconds - reward_seconds)
        peak_memory = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        rows = torch.arange(len(self.group))
        ids = self._response_ids(rows)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        candidates: list[list[Candidate]] = [[] for _ in self.prompts]
        for row, group in enumerate(self.group.tolist()):
            rejected_at = int(self.rejected_at[row]) or None
            score, final = float(self.score[row]), bool(self.final[row])
            candidates[group].append(Candidate(texts[row], ids[row], score, bool(self.eos[row]), final, rejected_at))
            self.stats[group].tokens_generated += int(self.length[row])
            self.stats[group].nan_rewards += int(final and math.isnan(score))
        for seconds, scored, counts in self.reward_calls:  # by reward tokens, else by rows
            weights = counts if counts and sum(counts) > 0 else [1] * scored.numel()
            for group, weight in zip(self.group[scored].tolist(), weights):
                self.stats[group].reward_seconds += seconds * weight / sum(weights)
        total_tokens = sum(stats.tokens_generated for stats in self.stats) or 1
        results = []
        for group, prompt in enumerate(self.prompts):
            stats = self.stats[group]
            stats.generation_seconds = generation_seconds * stats.tokens_generated / total_tokens
            stats.peak_kv_bytes, stats.peak_kv_reserved_bytes = self.peak_kv, self.peak_reserved
            stats.peak_memory_bytes = peak_memory
            best = best_final(candidates[group])
            results.append(GenerationResult(prompt, best.text, best.reward, candidates[group], stats))
        return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
