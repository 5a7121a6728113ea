"""The generation engine: exactness against transformers, pruning, schedules, rejection, errors."""

import math
import warnings
import zlib

import pytest
import torch
from lightning_sr.testing import make_tokenizer, tiny_gpt2, tiny_llama

from lightning_sr.generation import (
    FixedSchedule,
    MemorySchedule,
    SamplingParams,
    best_of_n,
    cache_bytes,
    keep_count,
    kv_bytes_per_token,
    prefill,
    speculative_rejection,
)
from lightning_sr.generation.rollout import left_pad
from lightning_sr.generation.sampling import filter_logits
from lightning_sr.rewards import FunctionReward

PROMPTS = ["the good day", "thanks", "please help you we are not very happy today"]


def text_hash_reward(prompt, response):
    """A deterministic reward that depends on the (partial) text, with no ties in practice."""
    return (zlib.crc32(f"{prompt}|{response}".encode()) % 100_003) / 100_003


HASH_REWARD = FunctionReward(text_hash_reward)
CONSTANT = FunctionReward(lambda prompt, response: 0.0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_equals_generate_on_left_padded_batch(build):
    tokenizer = make_tokenizer()
    model = build(tokenizer)
    results = best_of_n(
        model, tokenizer, CONSTANT, PROMPTS, n=1, sampling=SamplingParams(temperature=0, max_new_tokens=20)
    )
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"].sum(1).unique().numel() == len(PROMPTS)  # really different lengths
    generated = model.generate(
        **batch, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id
    )[:, batch["input_ids"].size(1) :]
    for result, row in zip(results, generated.tolist()):
        expected = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        (candidate,) = result.candidates
        assert candidate.token_ids == expected
        assert candidate.finished == (tokenizer.eos_token_id in row)


def test_dropping_rows_keeps_survivor_logits_exact(tokenizer):
    model = tiny_llama(tokenizer)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    pruned, full = prefill(model, ids, n=3), prefill(model, ids, n=3)
    torch.manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            tokens = torch.randint(4, len(tokenizer), (full.num_rows,))
            pruned.step(tokens)
            full.step(tokens)
        keep = torch.tensor([0, 2, 5, 7, 8])
        pruned.keep(keep)
        assert pruned.row_ids.tolist() == keep.tolist()
        assert cache_bytes(pruned.cache) * full.num_rows == cache_bytes(full.cache) * len(keep)
        for _ in range(3):
            tokens = torch.randint(4, len(tokenizer), (full.num_rows,))
            pruned.step(tokens[keep])
            full.step(tokens)
            torch.testing.assert_close(pruned.logits, full.logits[keep], rtol=1e-5, atol=1e-5)


def test_prefill_shares_the_prompt_across_samples(tokenizer, llama):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.inference_mode():
        rollout = prefill(llama, ids, n=4)
    assert rollout.num_rows == 12
    for p in range(len(PROMPTS)):
        rows = rollout.logits[p * 4 : p * 4 + 4]
        assert torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_matches_real_cache(build, dtype, tokenizer):
    model = build(tokenizer).to(dtype)
    ids, _ = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], 0, "cpu")
    with torch.inference_mode():
        rollout = prefill(model, [tokenizer(p)["input_ids"] for p in PROMPTS], n=2)
        assert rollout.kv_bytes == 2 * len(PROMPTS) * ids.size(1) * kv_bytes_per_token(model.config, dtype)
        rollout.step(torch.full((rollout.num_rows,), 5))
        assert rollout.kv_bytes == 2 * len(PROMPTS) * (ids.size(1) + 1) * kv_bytes_per_token(model.config, dtype)


def test_alpha_zero_is_best_of_n(tokenizer, llama):
    sampling = SamplingParams(max_new_tokens=12)
    bon = best_of_n(llama, tokenizer, HASH_REWARD, PROMPTS, n=4, sampling=sampling, seed=3)
    spr = speculative_rejection(
        llama, tokenizer, HASH_REWARD, PROMPTS, n=4, alpha=0.0,
        schedule=MemorySchedule(budget_bytes=10**9), sampling=sampling, seed=3,
    )
    for a, b in zip(bon, spr):
        assert [(c.text, c.token_ids, c.reward, c.finished) for c in a.candidates] == [
            (c.text, c.token_ids, c.reward, c.finished) for c in b.candidates
        ]
        assert (a.response, a.reward) == (b.response, b.reward)
        assert all(c.final and c.rejected_at is None for c in a.candidates)


def test_sampling_is_seeded(tokenizer, llama):
    def run(seed):
        results = best_of_n(llama, tokenizer, CONSTANT, PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=8), seed=seed)
        return [c.token_ids for r in results for c in r.candidates]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # Nucleus 0.7: 0.5 + 0.25 already covers it, so the last two go.
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.3)).tolist() == [[False, True, True, True]]


def _replay_memory_decisions(events, per_token, budget, min_tokens, first_rows, first_length):
    """Expected decision flags from the event stream and the schedule's arithmetic."""
    live, length, expected = first_rows, first_length, []
    for event in events:
        live_before = live - event.finished_rows
        expected.append(event.step >= min_tokens and live_before > 0 and live_before * (length + 1) * per_token > budget)
        live, length = event.live_rows, event.sequence_length
    return expected


def test_memory_schedule_keeps_cache_within_budget(tokenizer, llama):
    with torch.no_grad():  # EOS gets logit 0, never among the top 5: rows only end by rejection
        llama.lm_head.weight[tokenizer.eos_token_id] = 0.0
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    prompt_length = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    n, min_tokens = 8, 2
    budget = len(PROMPTS) * n * (prompt_length + 3) * per_token  # first decision at 3 tokens
    events = []
    speculative_rejection(
        llama, tokenizer, HASH_REWARD, PROMPTS, n=n, alpha=0.5,
        schedule=MemorySchedule(budget_bytes=budget, min_tokens=min_tokens),
        sampling=SamplingParams(max_new_tokens=60, top_k=5), observer=events.append,
    )
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert max(e.kv_bytes for e in events) <= budget
    assert all(e.kv_bytes == e.live_rows * e.sequence_length * per_token for e in events if e.live_rows)
    decisions = [e.decision for e in events]
    assert decisions == _replay_memory_decisions(events, per_token, budget, min_tokens, len(PROMPTS) * n, prompt_length)
    assert sum(decisions) >= 3
    for event in events:
        if event.rejected_rows:
            assert event.decision


def test_n_auto_is_the_largest_n_that_reaches_min_tokens(tokenizer, llama):
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    prompt_length = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    budget = 500_000
    results = speculative_rejection(
        llama, tokenizer, CONSTANT, PROMPTS, n="auto", alpha=0.5,
        schedule=MemorySchedule(budget_bytes=budget, min_tokens=16), sampling=SamplingParams(max_new_tokens=20),
    )
    n = len(results[0].candidates)
    row_bytes = len(PROMPTS) * (prompt_length + 15) * per_token
    assert n * row_bytes <= budget < (n + 1) * row_bytes


def test_memory_schedule_rejects_n_that_cannot_reach_min_tokens(tokenizer, llama):
    with pytest.raises(ValueError, match="n=64 rows per prompt need"):
        speculative_rejection(
            llama, tokenizer, CONSTANT, PROMPTS, n=64, schedule=MemorySchedule(budget_bytes=100_000, min_tokens=16)
        )


def test_memory_schedule_without_budget_on_cpu_is_an_error(tokenizer, llama):
    with pytest.raises(ValueError, match="explicit budget"):
        speculative_rejection(llama, tokenizer, CONSTANT, PROMPTS, n=2, schedule=MemorySchedule())


def _expected_rejections(result, prompt, tokenizer, lengths, alpha):
    """Replay the rejection rule on one prompt's candidates: {decision length: rejected indices}."""
    candidates = result.candidates
    ended_at = [c.rejected_at or len(c.token_ids) + c.finished for c in candidates]
    in_pool = [True] * len(candidates)
    expected = {}
    for length in lengths:
        live = [i for i, c in enumerate(candidates) if ended_at[i] > length or c.rejected_at == length]
        pool = [i for i in range(len(candidates)) if in_pool[i] and (i in live or ended_at[i] <= length)]
        if keep_count(len(pool), alpha) >= len(pool):
            continue
        def score(i):
            text = tokenizer.decode(candidates[i].token_ids[:length], skip_special_tokens=True) if i in live else candidates[i].text
            return text_hash_reward(prompt, text)
        ranked = sorted(pool, key=lambda i: (-score(i), i))
        for i in ranked[keep_count(len(pool), alpha):]:
            in_pool[i] = False
        rejected = sorted(i for i in ranked[keep_count(len(pool), alpha):] if i in live)
        if rejected:
            expected[length] = rejected
    return expected


@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_rejection_keeps_the_best_rows_and_answers_with_the_best_final(tokenizer, llama, alpha):
    lengths = [3, 6, 9]
    # Frequent stop words make some rows finish before decision points, so they rank with final scores.
    stops = tokenizer.convert_tokens_to_ids(["the", "a", "good", "you", "i", "is", "not", "day", "."])
    results = speculative_rejection(
        llama, tokenizer, HASH_REWARD, PROMPTS, n=8, alpha=alpha, schedule=FixedSchedule(lengths),
        sampling=SamplingParams(max_new_tokens=14, stop_token_ids=stops), seed=1,
    )
    finished_before_a_decision = 0
    for prompt, result in zip(PROMPTS, results):
        candidates = result.candidates
        finished_before_a_decision += sum(c.finished and len(c.token_ids) + 1 <= lengths[-1] for c in candidates)
        expected = _expected_rejections(result, prompt, tokenizer, lengths, alpha)
        actual = {}
        for i, c in enumerate(candidates):
            if c.rejected_at is not None:
                actual.setdefault(c.rejected_at, []).append(i)
        assert actual == expected
        assert any(c.final for c in candidates)  # at least one row always survives
        finals = [c for c in candidates if c.final]
        for c in candidates:
            if c.final:
                assert c.reward == pytest.approx(text_hash_reward(prompt, c.text))
            else:
                assert not c.finished and len(c.token_ids) == c.rejected_at
        assert result.reward == max(c.reward for c in finals)
        assert result.response == max(finals, key=lambda c: c.reward).text
        assert result.stats.live_rows_per_round[0] == 8
        assert result.stats.tokens_generated == sum(len(c.token_ids) + c.finished for c in candidates)
    assert finished_before_a_decision > 0


def test_nan_rewards_rank_last_and_are_counted(tokenizer, llama):
    def reward(prompt, response):
        return float("nan") if len(response.split()) % 2 else text_hash_reward(prompt, response)

    results = best_of_n(llama, tokenizer, FunctionReward(reward), PROMPTS, n=6, sampling=SamplingParams(max_new_tokens=9))
    for result in results:
        nans = sum(math.isnan(c.reward) for c in result.candidates)
        assert result.stats.nan_rewards == nans
        if nans < len(result.candidates):
            assert not math.isnan(result.reward)
    assert any(r.stats.nan_rewards for r in results)


def test_chat_message_prompts_use_the_chat_template(chat_tokenizer):
    model = tiny_llama(chat_tokenizer)
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "help"}]
    results = best_of_n(model, chat_tokenizer, CONSTANT, [messages, "help"], n=2, sampling=SamplingParams(max_new_tokens=4))
    assert [r.prompt for r in results] == [messages, "help"]


@pytest.mark.parametrize(
    "kwargs, prompts, message",
    [
        ({"alpha": 1.0}, PROMPTS, "alpha must be in"),
        ({"alpha": -0.1}, PROMPTS, "alpha must be in"),
        ({"n": 0}, PROMPTS, "n must be a positive integer"),
        ({"n": -3}, PROMPTS, "n must be a positive integer"),
        ({}, [], "non-empty list"),
        ({}, ["the day", ""], "prompt 1: the prompt is empty"),
        ({}, ["good " * 300], "prompt 0 has 300 tokens"),
        ({}, [[{"role": "user", "content": "hi"}]], "no chat template"),
        ({"n": "auto", "alpha": 0.0, "schedule": MemorySchedule(budget_bytes=10**6)}, PROMPTS, "needs alpha > 0"),
        ({"n": "auto"}, PROMPTS, "needs alpha > 0 and a MemorySchedule"),
    ],
)
def test_bad_input_is_a_clear_error(tokenizer, llama, kwargs, prompts, message):
    kwargs = {"n": 2, "schedule": FixedSchedule([2]), **kwargs}
    with pytest.raises(ValueError, match=message):
        speculative_rejection(llama, tokenizer, CONSTANT, prompts, **kwargs)


def test_reward_with_wrong_number_of_scores_is_an_error(tokenizer, llama):
    bad = FunctionReward(lambda prompts, responses: [0.0] * (len(responses) + 1), batched=True)
    with pytest.raises(ValueError, match="returned 5 scores for 4"):
        best_of_n(llama, tokenizer, bad, PROMPTS[:2], n=2, sampling=SamplingParams(max_new_tokens=3))


def test_budget_that_no_rejection_can_meet_stops_rows_with_a_warning(tokenizer, llama):
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    length = len(tokenizer("thanks")["input_ids"])
    budget = 2 * (length + 5) * per_token  # two rows reach 5 tokens; one row can't grow past 11
    with pytest.warns(UserWarning, match="cannot hold one more token"):
        (result,) = speculative_rejection(
            llama, tokenizer, HASH_REWARD, ["thanks"], n=2, alpha=0.5,
            schedule=MemorySchedule(budget_bytes=budget, min_tokens=2),
            sampling=SamplingParams(max_new_tokens=50, stop_token_ids=[]),
        )
    # Alone, the surviving row fills the budget's 2 * (length + 5) cache slots, then stops: its last
    # sampled token never enters the cache.
    (survivor,) = [c for c in result.candidates if c.rejected_at is None]
    assert survivor.final and not survivor.finished
    assert len(survivor.token_ids) == 2 * (length + 5) - length + 1


def test_cuda_budget_counts_the_allocators_cached_memory(monkeypatch):
    from lightning_sr.generation.memory import free_cuda_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30, 100))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 50)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 20)
    # 30 free on the device + 30 cached by PyTorch but unused - a 10% margin of 100.
    assert free_cuda_bytes(torch.device("cuda", 0), margin_fraction=0.1) == 50
    assert MemorySchedule(margin_fraction=0.1).resolve_budget(torch.device("cuda", 0)) == 50


def test_memory_decision_keeps_ranking_until_the_rows_fit(tokenizer, llama):
    """Finished rows with low scores are dropped from the pool first; ranking goes on at the same
    step until a live row goes, instead of stopping every live row for lack of room."""
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    stops = tokenizer.convert_tokens_to_ids(["the", "a", "good", "you", "i", "is", "not", "day", "."])
    longer_is_better = FunctionReward(lambda prompt, response: float(len(response.split())))
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot hold one more token" stop
        (result,) = speculative_rejection(
            llama, tokenizer, longer_is_better, ["thanks"], n=6, alpha=0.5,
            schedule=MemorySchedule(budget_bytes=24 * per_token, min_tokens=3),  # 2 rows x 12 tokens
            sampling=SamplingParams(max_new_tokens=16, stop_token_ids=stops), seed=13, observer=events.append,
        )
    (decision,) = [e.step for e in events if e.decision]
    finished_early = [c for c in result.candidates if c.finished and len(c.token_ids) + 1 < decision]
    live_at_decision = [c for c in result.candidates if len(c.token_ids) + c.finished >= decision]
    assert len(finished_early) >= 3 and len(live_at_decision) == 2  # the case under test
    assert sorted(c.rejected_at for c in live_at_decision if c.rejected_at) == [decision]
    (survivor,) = [c for c in live_at_decision if c.rejected_at is None]
    assert len(survivor.token_ids) + survivor.finished > decision  # it kept decoding
    assert result.stats.live_rows_per_round == [6, 1] and result.stats.rounds == 1
