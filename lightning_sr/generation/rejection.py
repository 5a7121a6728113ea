"""Speculative Rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290) and Best-of-N on one engine.

Algorithm 1 of the paper, with every sample of every prompt in one batch: prefill each prompt
once, then round after round generate for every live row up to a check (the step the
:class:`~lightning_sr.generation.schedules.Schedule` names, or the one that fills the round's KV
cache), where the schedule may make a decision point: the partial responses are scored and each
prompt's pool keeps its best rows (:func:`~lightning_sr.generation.decision.select_survivors`),
and the batch is compacted to the rows left. The answer for each prompt is its best
*final-scored* response. ``alpha = 0`` never rejects: that is Best-of-N, so both methods are
compared on the same engine, with the same samples for a seed.

:class:`_Run` is the algorithm; what it records for the caller (the host's row state, step
events, reward-call timing and statistics) is in :mod:`lightning_sr.generation.bookkeeping`. The
device keeps its own copy of what decoding changes (:class:`~lightning_sr.generation.rollout.Rollout`),
read back every step on CPU and every few steps on CUDA.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Sequence

import torch

from lightning_sr.generation.bookkeeping import Decision, RewardLedger, Rows, StepEvents, assemble_results
from lightning_sr.generation.decision import _keep_counts, select_survivors
from lightning_sr.generation.memory import cache_dtype, fit_n, kv_bytes_per_token
from lightning_sr.generation.prompts import Prompt, encode_prompts, row_limits, stop_token_ids
from lightning_sr.generation.results import GenerationResult, GenerationStats, Observer
from lightning_sr.generation.rollout import DecodeOptions, _sync_debug_mode, prefill
from lightning_sr.generation.sampling import SamplingParams, sample_next_token
from lightning_sr.generation.schedules import DecodeState, FixedSchedule, Schedule, as_schedule
from lightning_sr.rewards.base import RewardModel


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
    decode_options: DecodeOptions | None = None,
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
        decode_options: :class:`DecodeOptions` (read-back cadence, CUDA graphs).

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
    per_token = kv_bytes_per_token(model.config, cache_dtype(model))
    budget = None if alpha == 0 else schedule.kv_budget(model.device)
    if n == "auto" and budget is None:
        raise auto_error
    if budget is not None:  # every row must reach the first step the schedule may decide at
        if not hasattr(schedule, "min_tokens"):
            raise TypeError(f"{type(schedule).__name__} has a kv_budget but no min_tokens: a schedule with a budget "
                            "says before which generated length it never decides (Schedule.min_tokens)")  # fmt: skip
        n = fit_n(n, budget, per_token, prompt_ids, min(schedule.min_tokens, max(limits)))
    run = _Run(
        model=model, tokenizer=tokenizer, reward=reward, prompts=list(prompts), n=n, alpha=alpha,
        schedule=schedule if alpha > 0 else FixedSchedule([]),  # alpha = 0: no decision point
        budget=budget, per_token=per_token, sampling=sampling, observer=observer, options=decode_options or DecodeOptions(),
        eos_ids=stop_token_ids(model, tokenizer, sampling.stop_token_ids),
    )  # fmt: skip
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
    decode_options: DecodeOptions | None = None,
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
        decode_options=decode_options,
    )


class _Run:
    """One call of the engine: Algorithm 1 over every row of every prompt (:meth:`_decode`); its
    host state and records are :mod:`~lightning_sr.generation.bookkeeping`'s."""

    def __init__(self, model, tokenizer, reward, prompts, n, alpha, schedule, budget, per_token, sampling, eos_ids, observer, options):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.n, self.alpha, self.schedule, self.per_token = n, alpha, schedule, per_token
        self.budget_tokens = None if budget is None else budget // per_token
        self.budget, self.sampling, self.eos_ids, self.observer = budget, sampling, eos_ids, observer
        self.options = options
        self.device = model.device
        self.rows = Rows(len(prompts), n)
        self.stats = [GenerationStats(live_rows_per_round=[n]) for _ in prompts]
        self.ledger = RewardLedger(reward, self.rows.group, self.stats, self.device)
        self.rounds = 0  # decision points at which some pool shrank
        self.check_at: int | None = None  # the step the schedule named for the round's check
        self.peak_allocated: int | None = 0 if self.device.type == "cuda" else None

    def generate(self, prompt_ids: list[list[int]], limits: list[int], seed: int) -> list[GenerationResult]:
        start = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.width, self.max_limit = max(len(ids) for ids in prompt_ids), max(limits)
        rows = len(self.rows)
        self.events = StepEvents(self.width, self.per_token, len(self.prompts), rows, self.observer)
        self.check_at = self._next_check(0)
        capacity = self._capacity(rows)
        arena = rows * capacity
        if self.budget_tokens is not None:  # every later round fits in the first allocation
            arena = max(arena, min(self.budget_tokens, rows * (self.width + self.max_limit - 1)))
        self.rollout = prefill(
            self.model, prompt_ids, self.n, pad_id, limits=limits, capacity=capacity, arena_tokens=arena,
            eos_ids=self.eos_ids, dtype=cache_dtype(self.model), decode_options=self.options,
        )  # fmt: skip
        self._note_allocated()
        self._decode(generator)
        self._score(final_rows=self.rows.pending_finals(), partial_rows=torch.zeros(0, dtype=torch.long))
        return self._results(time.perf_counter() - start)

    def _decode(self, generator: torch.Generator) -> None:
        """Algorithm 1 of the paper, one round per iteration, until no row is live.

        A round generates for every live row up to the round's check: the step the schedule
        named, or the one at which the round's KV cache (sized to reach that step within the
        budget) is full; the paper generates until the memory is full. There the schedule may
        make it a decision point (:meth:`_decide`: score the partial responses, keep each
        prompt's best ``k(m) = max(1, ceil((1 - alpha) m))``). Then the rows the budget cannot
        hold stop, the batch is compacted to the rows left, with a cache sized for the next
        round, and the token sampled at the check is appended.
        """
        step = 0
        with self._no_syncs():  # with DecodeOptions(debug_syncs=True) a host sync here raises
            while True:
                step = self._decode_to_check(generator, step)
                if not self.rows.any_live():
                    return
                with _sync_debug_mode("default"):  # at the round's check
                    decision = self._decide(step) if self.schedule.should_decide(self._state(step)) else None
                    self._stop_rows_that_cannot_fit(step)
                    if self.rows.any_live():
                        self.check_at = self._next_check(step)
                        self._compact(step)
                    self._emit_events(step, decision)
                if not self.rows.any_live():
                    return
                self.rollout.step()  # append the token sampled at the check for the slots left

    def _decode_to_check(self, generator: torch.Generator, step: int) -> int:
        """Sample and append a token for every slot, step after step, until the round's check
        with a row live (returned with nothing decided there) or until no row is live.

        Sampling and marking the rows a token ends (EOS, stop id, length limit) stay on the
        device; the host reads the rows back only when :meth:`_read_back_due`. Between checks a
        read-back stops the rows the budget cannot hold, compacts the batch when few rows are
        live (looked at every ``sync_every`` steps, so CPU and CUDA compact alike) and emits the
        events of the steps read back.
        """
        while True:
            step += 1
            self.rollout.mark(sample_next_token(self.rollout.logits, self.sampling, generator), step)
            if self._read_back_due(step):
                with _sync_debug_mode("default"):
                    self._read_back()
                    if self._is_check(step) and self.rows.any_live():
                        return step
                    self._stop_rows_that_cannot_fit(step)
                    if self.rows.any_live() and self._few_live(step):
                        self._compact(step)
                    self._emit_events(step, None)
                    if not self.rows.any_live():
                        return step
            self.rollout.step()  # append the sampled tokens of the slots left, next logits

    # ------------------------------------------------------------------ when to look

    def _no_syncs(self):
        debug = self.options.debug_syncs and self.device.type == "cuda"
        return _sync_debug_mode("error") if debug else contextlib.nullcontext()

    def _read_back_due(self, step: int) -> bool:
        """Every step on CPU; on CUDA every ``sync_every`` steps, at checks and at the last step."""
        cuda = self.device.type == "cuda"
        return not cuda or step % self.options.sync_every == 0 or self._is_check(step) or step >= self.max_limit

    def _is_check(self, step: int) -> bool:
        """The schedule is asked at the step it named and whenever the round's cache is full."""
        return step == self.check_at or self.rollout.sequence_length >= self.rollout.capacity

    def _read_back(self) -> None:
        """The one host sync of a read-back: the rows' state from the device."""
        live, eos, length = self.rollout.read_back()
        self._note_allocated()
        self.rows.read_back(live, eos, length)
        self.events.read_back(self.rounds, self.rollout.cache.reserved_bytes)

    def _note_allocated(self) -> None:
        """Keep the highest CUDA memory allocated seen so far: ``GenerationStats.peak_memory_bytes``.

        Sampled, not the allocator's peak: a per-call peak would mean resetting the process-wide
        peak statistics, which belong to whoever profiles the run (GPUMemoryProfiler resets them
        per batch). ``memory_allocated`` is a host-side counter: no device sync.
        """
        if self.peak_allocated is not None:
            self.peak_allocated = max(self.peak_allocated, int(torch.cuda.memory_allocated(self.device)))

    def _state(self, step: int) -> DecodeState:
        """The batch as the schedule sees it: ``step`` sampled, not yet in the cache."""
        live = int(self.rows.live.sum())
        return DecodeState(step, self.width + step, live, len(self.prompts), self.per_token, self.budget)

    def _next_check(self, step: int) -> int | None:
        check = self.schedule.next_check(self._state(step))
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

    # ------------------------------------------------------------------ what to do there

    def _decide(self, step: int) -> Decision:
        """A decision point of Algorithm 1: score the partial responses, reject the weakest.

        Per prompt, the pool (live rows, and ended rows not yet ranked out) keeps its best
        ``k(m)`` rows (:func:`~lightning_sr.generation.decision.keep_count`; the paper's cut at
        the alpha-quantile of the scores). Only the pools that shrink, ``k(m) < m``, are scored:
        their live rows as partial responses, in one reward call with the ended rows still
        lacking a final score. The rows that fit one more token in the budget, ``T // (W + t)``,
        cap the live survivors (:func:`~lightning_sr.generation.decision.select_survivors`).
        """
        rows = self.rows
        pooled = rows.pool.nonzero().squeeze(1)
        groups = rows.group[pooled]
        sizes = torch.bincount(groups, minlength=len(self.prompts))
        shrinking = (_keep_counts(sizes, self.alpha) < sizes).nonzero().squeeze(1)
        if shrinking.numel() == 0:
            return Decision(rejected=0)
        self.rounds += 1
        self._score(final_rows=rows.pending_finals(), partial_rows=pooled[torch.isin(groups, shrinking) & rows.live[pooled]])
        max_live = None if self.budget_tokens is None else self.budget_tokens // (self.width + step)
        keep = select_survivors(rows.score[pooled], groups, ~rows.live[pooled], self.alpha, max_live)
        rejected = rows.drop(pooled[~keep], step)
        self.rollout.end(rejected)
        for group in shrinking.tolist():
            self.stats[group].rounds += 1
            self.stats[group].live_rows_per_round.append(rows.live_in(group))
        return Decision(rejected=int(rejected.numel()))

    def _few_live(self, step: int) -> bool:
        """Fewer than ``compact_below`` of the slots hold a live row, at a ``sync_every`` step."""
        live = int(self.rows.live[self.rollout.slot_rows].sum())
        return step % self.options.sync_every == 0 and live < self.options.compact_below * self.rollout.num_slots

    def _compact(self, step: int) -> None:
        """Keep the slots of the live rows only, with the next round's capacity."""
        live = self.rows.live[self.rollout.slot_rows].nonzero().squeeze(1)
        self.rollout.resize(live, max(self._capacity(live.numel()), self.width + step))

    def _stop_rows_that_cannot_fit(self, step: int) -> None:
        """No rejection made room for one more token: the live rows end here, scored as they are."""
        live = self.rows.live.nonzero().squeeze(1)
        if self.budget_tokens is None or live.numel() * (self.width + step) <= self.budget_tokens:
            return
        _warn_caller(
            f"the memory budget of {self.budget} bytes cannot hold one more token for the "
            f"{live.numel()} rows left at {step} tokens: they stop here and are scored as they are "
            "(raise the budget or lower n)"
        )
        self.rows.live[live] = False
        self.rollout.end(live)

    # ------------------------------------------------------------------ scores, events, results

    def _emit_events(self, step: int, decision: Decision | None) -> None:
        self.events.emit(step, self.rows, self.rounds, self.rollout.cache.reserved_bytes, decision)

    def _response_ids(self, rows: torch.Tensor) -> list[list[int]]:
        """Generated ids of each row, without the EOS or stop token that ended it."""
        ids = self.rollout.tokens[rows.to(self.device)].tolist()
        ends = (self.rows.length[rows] - self.rows.eos[rows].long()).tolist()
        return [row_ids[:end] for row_ids, end in zip(ids, ends)]

    def _score(self, final_rows: torch.Tensor, partial_rows: torch.Tensor) -> None:
        """One reward call: final scores for ended rows, partial scores for live ones (the
        response so far, scored as a complete turn)."""
        rows = torch.cat([final_rows, partial_rows])
        if rows.numel() == 0:
            return
        texts = self.tokenizer.batch_decode(self._response_ids(rows), skip_special_tokens=True)
        prompts = [self.prompts[group] for group in self.rows.group[rows].tolist()]
        scores = self.ledger.score(rows, prompts, texts)
        self.rows.score[rows] = torch.tensor(scores, dtype=self.rows.score.dtype)
        self.rows.final[final_rows] = True

    def _results(self, total_seconds: float) -> list[GenerationResult]:
        self._note_allocated()  # after the final reward call
        ids = self._response_ids(torch.arange(len(self.rows)))
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return assemble_results(
            self.prompts, self.rows, ids, texts, self.stats, self.ledger, self.events, total_seconds, self.peak_allocated
        )


def _warn_caller(message: str) -> None:
    """Warn at the first frame outside the engine (``lightning_sr.generation``): its caller's."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lightning_sr.generation"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
