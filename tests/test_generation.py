"""The generation engine: exactness against transformers, pruning, schedules, rejection, errors."""

import math
import warnings
import zlib

import pytest
import torch
from lightning_sr.testing import make_tokenizer, tiny_gpt2, tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_sr.generation import (
    DecodeOptions,
    FixedSchedule,
    MemorySchedule,
    SamplingParams,
    Schedule,
    best_of_n,
    kv_bytes_per_token,
    speculative_rejection,
)
from lightning_sr.generation.cache import StaticKVCache
from lightning_sr.generation.decision import keep_count, select_survivors
from lightning_sr.generation.memory import cache_bytes
from lightning_sr.generation.prompts import context_length
from lightning_sr.generation.rollout import Rollout, left_pad, prefill
from lightning_sr.generation.sampling import filter_logits, sample_next_token
from lightning_sr.rewards import FunctionReward
from user_callbacks import EveryKTokens

PROMPTS = ["the good day", "thanks", "please help you we are not very happy today"]


def text_hash_reward(prompt, response):
    """A deterministic reward that depends on the (partial) text, with no ties in practice."""
    return (zlib.crc32(f"{prompt}|{response}".encode()) % 100_003) / 100_003


HASH_REWARD = FunctionReward(text_hash_reward)
CONSTANT = FunctionReward(lambda prompt, response: 0.0)


def _special_ids(tokenizer):
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def tiny_mistral(tokenizer, sliding_window=3):
    """A 2-layer Mistral whose sliding window (3) is shorter than the prompts."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=sliding_window, **_special_ids(tokenizer))  # fmt: skip
    return MistralForCausalLM(config).eval()


def tiny_qwen2(tokenizer, sliding_window=3):
    """A 3-layer Qwen2: one full-attention layer, then two sliding-window layers."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1,
                         **_special_ids(tokenizer))  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


ARCHITECTURES = [tiny_llama, tiny_gpt2, tiny_mistral, tiny_qwen2]
ARCHITECTURE_IDS = ["llama-gqa", "gpt2", "mistral-sliding", "qwen2-mixed"]


def greedy_generate(model, tokenizer, prompt_ids, max_new_tokens):
    """``model.generate`` on left-padded ids, cut at the first EOS."""
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, model.device)
    generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id)[:, ids.size(1):]  # fmt: skip
    rows = generated.tolist()
    return [row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row for row in rows]


@pytest.mark.parametrize("build", ARCHITECTURES, ids=ARCHITECTURE_IDS)
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
        assert candidate.eos == (tokenizer.eos_token_id in row)


def test_sliding_window_matters_in_the_test_models(tokenizer):
    """The windowed models decode differently without their window: the tests above exercise it."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for build in (tiny_mistral, tiny_qwen2):
        windowed = greedy_generate(build(tokenizer), tokenizer, ids, 12)
        assert windowed != greedy_generate(build(tokenizer, sliding_window=None), tokenizer, ids, 12)


@pytest.mark.parametrize("build", ARCHITECTURES, ids=ARCHITECTURE_IDS)
def test_dropping_rows_keeps_survivor_logits_exact(tokenizer, build):
    model = build(tokenizer)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    pruned, full = prefill(model, ids, n=3, capacity=20), prefill(model, ids, n=3, capacity=20)
    torch.manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            tokens = torch.randint(4, len(tokenizer), (full.num_slots,))
            pruned.step(tokens)
            full.step(tokens)
        keep = torch.tensor([0, 2, 5, 7, 8])
        pruned.resize(keep, capacity=pruned.capacity)
        assert pruned.slots.tolist() == keep.tolist()
        assert cache_bytes(pruned.cache) * full.num_slots == cache_bytes(full.cache) * len(keep)
        for _ in range(3):
            tokens = torch.randint(4, len(tokenizer), (full.num_slots,))
            pruned.step(tokens[keep])
            full.step(tokens)
            torch.testing.assert_close(pruned.logits, full.logits[keep], rtol=1e-5, atol=1e-5)


def test_prefill_shares_the_prompt_across_samples(tokenizer, llama):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.inference_mode():
        rollout = prefill(llama, ids, n=4)
    assert rollout.num_slots == 12
    for p in range(len(PROMPTS)):
        rows = rollout.logits[p * 4 : p * 4 + 4]
        assert torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("build", ARCHITECTURES, ids=ARCHITECTURE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_matches_real_cache(build, dtype, tokenizer):
    model = build(tokenizer).to(dtype)
    ids, _ = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], 0, "cpu")
    per_token = kv_bytes_per_token(model.config, dtype)
    with torch.inference_mode():
        rollout = prefill(model, [tokenizer(p)["input_ids"] for p in PROMPTS], n=2, capacity=ids.size(1) + 4)
        layer = rollout.cache.layers[0]
        assert layer.keys.dtype == dtype and layer.keys.shape[0] == 2 * len(PROMPTS)
        assert cache_bytes(rollout.cache) == 2 * len(PROMPTS) * (ids.size(1) + 4) * per_token
        assert rollout.cache.reserved_bytes == cache_bytes(rollout.cache)
        rollout.step(torch.full((rollout.num_slots,), 5))
        assert rollout.sequence_length == ids.size(1) + 1
        assert rollout.cache.reserved_bytes == 2 * len(PROMPTS) * (ids.size(1) + 4) * per_token


def test_alpha_zero_is_best_of_n(tokenizer, llama):
    sampling = SamplingParams(max_new_tokens=12)
    bon = best_of_n(llama, tokenizer, HASH_REWARD, PROMPTS, n=4, sampling=sampling, seed=3)
    spr = speculative_rejection(
        llama, tokenizer, HASH_REWARD, PROMPTS, n=4, alpha=0.0,
        schedule=MemorySchedule(budget_bytes=10**9), sampling=sampling, seed=3,
    )
    for a, b in zip(bon, spr):
        assert [(c.text, c.token_ids, c.reward, c.eos) for c in a.candidates] == [
            (c.text, c.token_ids, c.reward, c.eos) for c in b.candidates
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


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (4, 0.7), (0, 0.7), (0, 1.0)])
def test_sampling_draws_from_the_filtered_distribution(top_k, top_p):
    logits = torch.log(torch.tensor([0.05, 0.4, 0.02, 0.25, 0.15, 0.13]))
    expected = filter_logits(logits[None], top_k, top_p).softmax(-1)[0]
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    draws = sample_next_token(logits.expand(40_000, -1), params, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=6) / draws.numel()
    assert torch.equal(frequencies > 0, expected > 0)  # never outside top-k / the nucleus
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.7])
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (50, 0.8), (0, 0.9), (0, 1.0)])
def test_temperature_after_top_k_draws_what_scaling_first_draws(temperature, top_k, top_p):
    """The temperature divides only the top-k survivors: the same draws for a seed as dividing
    the whole vocabulary first (``temperature=1`` on pre-scaled logits is that older path)."""
    logits = torch.randn(32, 500, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    scaled_first = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    for seed in range(3):
        draws = sample_next_token(logits, params, torch.Generator().manual_seed(seed))
        expected = sample_next_token(logits / temperature, scaled_first, torch.Generator().manual_seed(seed))
        assert torch.equal(draws, expected)


def _replay_memory_decisions(events, per_token, budget, min_tokens, first_rows, first_length):
    """Expected decision flags from the event stream and the schedule's arithmetic."""
    live, length, expected = first_rows, first_length, []
    for event in events:
        live_before = live - event.ended_rows
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
    assert all(e.kv_bytes <= e.kv_reserved_bytes <= budget for e in events)  # the arena itself stays within it
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
    ended_at = [c.rejected_at or len(c.token_ids) + c.eos for c in candidates]
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
        finished_before_a_decision += sum(c.eos and len(c.token_ids) + 1 <= lengths[-1] for c in candidates)
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
                assert not c.eos and len(c.token_ids) == c.rejected_at
        assert result.reward == max(c.reward for c in finals)
        assert result.response == max(finals, key=lambda c: c.reward).text
        assert result.stats.live_rows_per_round[0] == 8
        assert result.stats.tokens_generated == sum(len(c.token_ids) + c.eos for c in candidates)
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


def test_prompts_are_rendered_with_the_chat_template(chat_tokenizer):
    """Strings and message lists alike decode from the template's rendering, generation prompt
    included; ``chat_template=False`` decodes a string as plain text."""
    model = tiny_llama(chat_tokenizer)
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "help"}]
    rendered = ["<s> system be kind </s> <s> user help </s> <s> assistant", "<s> user help </s> <s> assistant"]
    ids = [chat_tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    sampling = SamplingParams(temperature=0, max_new_tokens=8)
    results = best_of_n(model, chat_tokenizer, CONSTANT, [messages, "help"], n=1, sampling=sampling)
    assert [r.prompt for r in results] == [messages, "help"]
    assert [r.candidates[0].token_ids for r in results] == greedy_generate(model, chat_tokenizer, ids, 8)
    (plain,) = best_of_n(model, chat_tokenizer, CONSTANT, ["help"], n=1, sampling=sampling, chat_template=False)
    expected = greedy_generate(model, chat_tokenizer, [chat_tokenizer("help")["input_ids"]], 8)
    assert [plain.candidates[0].token_ids] == expected != [results[1].candidates[0].token_ids]


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
    assert survivor.final and not survivor.eos
    assert len(survivor.token_ids) == 2 * (length + 5) - length + 1


def test_cuda_budget_counts_the_allocators_cached_memory(monkeypatch):
    from lightning_sr.generation.memory import free_cuda_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30, 100))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 50)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 20)
    # 30 free on the device + 30 cached by PyTorch but unused - a 10% margin of 100.
    assert free_cuda_bytes(torch.device("cuda", 0), margin_fraction=0.1) == 50
    assert MemorySchedule(margin_fraction=0.1).kv_budget(torch.device("cuda", 0)) == 50


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
            sampling=SamplingParams(max_new_tokens=16, stop_token_ids=stops), seed=47, observer=events.append,
        )
    (decision,) = [e.step for e in events if e.decision]
    finished_early = [c for c in result.candidates if c.eos and len(c.token_ids) + 1 < decision]
    live_at_decision = [c for c in result.candidates if len(c.token_ids) + c.eos >= decision]
    assert len(finished_early) >= 3 and len(live_at_decision) == 2  # the case under test
    assert sorted(c.rejected_at for c in live_at_decision if c.rejected_at) == [decision]
    (survivor,) = [c for c in live_at_decision if c.rejected_at is None]
    assert len(survivor.token_ids) + survivor.eos > decision  # it kept decoding
    assert result.stats.live_rows_per_round == [6, 1] and result.stats.rounds == 1


# ------------------------------------------------------------------------------ select_survivors


def reference_survivors(scores, groups, final, alpha, max_live=None):
    """The rule written out row by row: rank each pool (NaN last, ties to the earlier row), cut,
    and cut the survivors again while too many live rows remain and a pool can still shrink."""
    pools = {}
    for row, group in enumerate(groups):
        pools.setdefault(group, []).append(row)
    ranked = {g: sorted(rows, key=lambda r: (-(scores[r] if not math.isnan(scores[r]) else -math.inf), r))
              for g, rows in pools.items()}  # fmt: skip
    kept = {g: keep_count(len(rows), alpha) for g, rows in pools.items()}
    while True:
        survivors = {r for g, rows in ranked.items() for r in rows[: kept[g]]}
        live = sum(not final[r] for r in survivors)
        fewer = {g: keep_count(k, alpha) for g, k in kept.items()}
        if max_live is None or live <= max_live or fewer == kept:
            return [row in survivors for row in range(len(scores))]
        kept = fewer


def test_select_survivors_ranks_each_pool_nan_last_ties_to_the_earlier_row():
    nan = math.nan
    scores = torch.tensor([0.1, nan, 0.5, 0.5, 0.9, 0.2, 0.3, nan, -5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    final = torch.tensor([False, False, True, False, False, True, False, False, False])
    keep = select_survivors(scores, groups, final, alpha=0.75)
    # Pool 0 keeps 1 of 4: the tie at 0.5 goes to row 2, a final row, which takes the slot. Pool 1
    # keeps 1 of 3 (row 4). Pool 2 keeps 1 of 2: NaN ranks below -5.
    assert keep.tolist() == [False, False, True, False, True, False, False, False, True]
    keep = select_survivors(scores, groups, final, alpha=0.5)
    assert keep.tolist() == [False, False, True, True, True, False, True, False, True]


def test_select_survivors_cuts_again_until_the_live_rows_fit():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    groups = torch.zeros(4, dtype=torch.long)
    # Two live rows on top: the first cut keeps both, the second keeps one.
    final = torch.tensor([False, False, True, True])
    assert select_survivors(scores, groups, final, 0.5, max_live=2).tolist() == [True, True, False, False]
    assert select_survivors(scores, groups, final, 0.5, max_live=1).tolist() == [True, False, False, False]
    # A final row on top: cutting to one row leaves no live row at all.
    final = torch.tensor([True, False, False, False])
    assert select_survivors(scores, groups, final, 0.5, max_live=0).tolist() == [True, False, False, False]
    # Nothing fits and the pool is at one row: the floor is returned, the caller stops the row.
    final = torch.zeros(4, dtype=torch.bool)
    assert select_survivors(scores, groups, final, 0.5, max_live=0).tolist() == [True, False, False, False]


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.75, 0.9])
def test_select_survivors_matches_the_rule_on_random_pools(alpha):
    generator = torch.Generator().manual_seed(int(alpha * 100))
    for trial in range(40):
        rows = int(torch.randint(1, 30, (1,), generator=generator))
        scores = torch.randint(0, 6, (rows,), generator=generator).float() / 5  # many ties
        scores[torch.rand(rows, generator=generator) < 0.2] = math.nan
        groups = torch.randint(0, 4, (rows,), generator=generator)
        final = torch.rand(rows, generator=generator) < 0.3
        max_live = None if trial % 3 == 0 else int(torch.randint(0, rows + 1, (1,), generator=generator))
        keep = select_survivors(scores, groups, final, alpha, max_live)
        assert keep.tolist() == reference_survivors(scores.tolist(), groups.tolist(), final.tolist(), alpha, max_live)
        for group in groups.unique():  # never fewer than one row per pool
            assert keep[groups == group].any()


def test_keep_counts():
    assert [keep_count(size, 0.5) for size in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    assert [keep_count(size, 0.1) for size in range(1, 7)] == [1, 2, 3, 4, 5, 6]  # small pools never shrink
    assert [keep_count(size, 0.9) for size in (1, 10, 11, 64)] == [1, 1, 2, 7]
    assert keep_count(10, 0.7) == 3  # 0.3 x 10 is 3.0000000000000004 in floating point


def test_vectorised_keep_counts_match_the_formula():
    """``_keep_counts`` (what the engine and ``select_survivors`` use) is ``k(m) = max(1, ceil((1 - alpha) m))``.

    The formula is evaluated exactly (the decimal alpha as a fraction), so float rounding in the
    vectorised code, e.g. ``(1 - 0.7) * 10 = 3.0000000000000004`` ceiling to 4, fails here.
    """
    from fractions import Fraction

    from lightning_sr.generation.decision import _keep_counts

    sizes = torch.arange(1, 65)
    for alpha in (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99):
        exact = [max(1, math.ceil((1 - Fraction(str(alpha))) * m)) for m in range(1, 65)]
        assert _keep_counts(sizes, alpha).tolist() == exact, alpha
        assert [keep_count(m, alpha) for m in range(1, 65)] == exact, alpha
    assert _keep_counts(torch.tensor([10]), 0.7).tolist() == [3]


# ------------------------------------------------------------------------------ static cache


def test_cache_resize_moves_the_survivors_within_the_arena(tokenizer, llama):
    torch.manual_seed(0)
    cache = StaticKVCache(llama.config, rows=6, capacity=5, dtype=torch.float32, device="cpu", arena_tokens=40)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
    cache.length = 4
    before = [(layer.keys[:, :, :4].clone(), layer.values[:, :, :4].clone()) for layer in cache.layers]
    arena = cache.arena.data_ptr()
    for keep, capacity in (([0, 2, 3, 5], 9), ([1, 3], 20), ([0, 1], 6)):  # fewer rows, longer; then shorter
        cache.resize(torch.tensor(keep), capacity)
        before = [(k[keep], v[keep]) for k, v in before]
        assert cache.arena.data_ptr() == arena and (cache.rows, cache.capacity) == (len(keep), capacity)
        for layer, (keys, values) in zip(cache.layers, before):
            assert layer.keys.shape == (len(keep), cache.kv_heads, capacity, cache.head_dim)
            assert layer.keys.is_contiguous()
            assert torch.equal(layer.keys[:, :, :4], keys) and torch.equal(layer.values[:, :, :4], values)
    cache.resize(torch.tensor([0, 1]), 30)  # 2 x 30 > 40 token slots: a larger arena, same contents
    assert cache.reserved_bytes == 60 * kv_bytes_per_token(llama.config, torch.float32)
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys[:, :, :4], keys) and torch.equal(layer.values[:, :, :4], values)
    with pytest.raises(ValueError, match="cannot hold the 4 columns"):
        cache.resize(torch.tensor([0]), 3)


def test_decoding_writes_the_cache_in_place_and_compacts_only_between_rounds(tokenizer, llama, monkeypatch):
    """One arena for the whole call; rows are compacted at decision points only."""
    arenas, resized = set(), []
    step = Rollout.step

    def recording_step(self, tokens=None):
        arenas.add(self.cache.arena.data_ptr())
        return step(self, tokens)

    resize = Rollout.resize

    def recording_resize(self, keep, capacity):
        resized.append((self.sequence_length, len(keep), capacity))
        return resize(self, keep, capacity)

    monkeypatch.setattr(Rollout, "step", recording_step)
    monkeypatch.setattr(Rollout, "resize", recording_resize)
    with torch.no_grad():  # EOS gets logit 0, never among the top 5: rows end by length or rejection
        llama.lm_head.weight[tokenizer.eos_token_id] = 0.0
    width = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    speculative_rejection(llama, tokenizer, CONSTANT, PROMPTS, n=4, alpha=0.5, schedule=FixedSchedule([3, 7]),
                          sampling=SamplingParams(max_new_tokens=12, top_k=5), decode_options=DecodeOptions(compact_below=0.0))  # fmt: skip
    assert len(arenas) == 1
    # At 3 tokens: 12 rows -> 6, room to the next decision; at 7: 6 -> 3, room to the last token.
    assert resized == [(width + 2, 6, width + 6), (width + 6, 3, width + 11)]


def test_compacting_ended_rows_does_not_change_greedy_results(tokenizer, llama):
    prompts = PROMPTS + ["i love this city", "no", "we are happy", "sorry", "the capital of france"]
    stops = tokenizer.convert_tokens_to_ids(["the", "a", "good", "you", "i", "is", "not", "day", "."])
    sampling = SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=stops)
    runs = [
        best_of_n(llama, tokenizer, CONSTANT, prompts, n=1, sampling=sampling,
                  decode_options=DecodeOptions(sync_every=sync_every, compact_below=compact_below))  # fmt: skip
        for sync_every, compact_below in ((1, 0.0), (1, 1.0), (4, 0.6))
    ]
    ids = [[c.token_ids for r in results for c in r.candidates] for results in runs]
    assert ids[0] == ids[1] == ids[2]
    assert len({len(row) for row in ids[0]}) >= 4  # rows really ended at different steps


def test_the_cache_is_freed_when_the_call_returns(tokenizer, llama, monkeypatch):
    """No reference cycle keeps the KV arena alive until the garbage collector runs."""
    import gc
    import weakref

    caches = []
    init = StaticKVCache.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.append(weakref.ref(self))

    monkeypatch.setattr(StaticKVCache, "__init__", recording_init)
    gc.collect()
    gc.disable()
    try:
        speculative_rejection(llama, tokenizer, HASH_REWARD, PROMPTS, n=4, alpha=0.5, schedule=FixedSchedule([2]),
                              sampling=SamplingParams(max_new_tokens=5))  # fmt: skip
        assert len(caches) == 1 and caches[0]() is None
    finally:
        gc.enable()


def test_best_of_n_reserves_the_prompts_plus_max_new_tokens(tokenizer, llama):
    events = []
    best_of_n(llama, tokenizer, CONSTANT, PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=9), observer=events.append)
    width = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    reserved = 2 * len(PROMPTS) * (width + 8) * kv_bytes_per_token(llama.config, llama.dtype)
    assert {e.kv_reserved_bytes for e in events} == {reserved}
    assert all(e.kv_bytes <= e.kv_reserved_bytes for e in events)


# ------------------------------------------------------------------------------ schedules


def test_a_user_schedule_drives_the_decisions(tokenizer, llama):
    assert isinstance(EveryKTokens(), Schedule)
    assert isinstance(MemorySchedule(), Schedule) and isinstance(FixedSchedule(), Schedule)
    events = []
    (result,) = speculative_rejection(llama, tokenizer, HASH_REWARD, ["thanks"], n=8, alpha=0.5,
                                      schedule=EveryKTokens(3), sampling=SamplingParams(max_new_tokens=10),
                                      observer=events.append)  # fmt: skip
    decided = [e.step for e in events if e.decision]
    assert decided == [3, 6, 9][: len(decided)] and len(decided) >= 2
    assert result.stats.rounds == len(decided)
    assert result.stats.live_rows_per_round[0] == 8 and result.stats.live_rows_per_round[1] <= 4
    with pytest.raises(TypeError, match="must implement lightning_sr.generation.Schedule"):
        speculative_rejection(llama, tokenizer, HASH_REWARD, ["thanks"], n=2, schedule=object())


def test_schedule_protocol_is_accepted_by_class_path():
    """LightningCLI/jsonargparse accept any implementation for a ``Schedule``-typed argument."""
    jsonargparse = pytest.importorskip("jsonargparse")

    def module(schedule: Schedule | None = None):
        return schedule

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(module)
    for class_path, init in (
        ("lightning_sr.generation.MemorySchedule", {"budget_bytes": 1000, "min_tokens": 4}),
        ("lightning_sr.generation.FixedSchedule", {"lengths": [4, 8]}),
        ("user_callbacks.EveryKTokens", {"k": 5}),
    ):
        config = parser.parse_object({"schedule": {"class_path": class_path, "init_args": init}})
        schedule = parser.instantiate_classes(config).schedule
        assert isinstance(schedule, Schedule) and type(schedule).__name__ == class_path.rsplit(".", 1)[1]
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object({"schedule": {"class_path": "lightning_sr.generation.SamplingParams"}})


def test_min_tokens_is_part_of_the_schedule_protocol(tokenizer, llama):
    """Every schedule says before which generated length it never decides; with a budget, ``n``
    is fitted so every row reaches it. A schedule without the ``Schedule`` base and with a
    budget must define it; subclasses inherit 1."""
    assert MemorySchedule(min_tokens=5).min_tokens == 5
    assert FixedSchedule([6, 3]).min_tokens == 3 and FixedSchedule().min_tokens == 1
    width = len(tokenizer("thanks")["input_ids"])
    budget = 10 * (width + 3) * kv_bytes_per_token(llama.config, llama.dtype)  # n = 10 rows to reach 4 tokens

    class Budgeted:  # a user's schedule, no lightning_sr base class
        def __init__(self, **attributes):
            self.__dict__.update(attributes)

        def kv_budget(self, device):
            return budget

        def next_check(self, state):
            return None

        def should_decide(self, state):
            return MemorySchedule(budget, getattr(self, "min_tokens", 1)).should_decide(state)

    class Inherits(Schedule):
        kv_budget, next_check, should_decide = Budgeted.kv_budget, Budgeted.next_check, Budgeted.should_decide

    def n_auto(schedule):
        (result,) = speculative_rejection(llama, tokenizer, CONSTANT, ["thanks"], n="auto", schedule=schedule,
                                          sampling=SamplingParams(max_new_tokens=6))  # fmt: skip
        return len(result.candidates)

    assert n_auto(Budgeted(min_tokens=4)) == n_auto(MemorySchedule(budget_bytes=budget, min_tokens=4)) == 10
    assert Inherits().min_tokens == 1
    assert n_auto(Inherits()) == n_auto(MemorySchedule(budget_bytes=budget, min_tokens=1)) == 10 * (width + 3) // width
    with pytest.raises(TypeError, match="Budgeted has a kv_budget but no min_tokens"):
        n_auto(Budgeted())


def test_context_length_of_a_config(tokenizer, llama):
    assert context_length(llama.config) == 256
    assert context_length(tiny_gpt2(tokenizer).config) == 128
    assert context_length(object()) is None


# ------------------------------------------------------------------------------ accounting


def test_reward_seconds_are_shared_by_reward_tokens(tokenizer, llama):
    class CountingReward:
        """Takes 50 ms per call and reads 1 token per row of prompt 0, 3 per row of prompt 1."""

        def __init__(self, report_counts):
            self.report_counts = report_counts
            self.last_token_counts = None

        def score(self, prompts, responses):
            import time

            time.sleep(0.05)
            if self.report_counts:
                self.last_token_counts = [1 if prompt == "thanks" else 3 for prompt in prompts]
            return torch.zeros(len(responses))

    sampling = SamplingParams(max_new_tokens=4)
    for report, ratio in ((True, 3.0), (False, 1.0)):
        a, b = best_of_n(llama, tokenizer, CountingReward(report), ["thanks", "the good day"], n=2, sampling=sampling)
        assert b.stats.reward_seconds / a.stats.reward_seconds == pytest.approx(ratio)
        assert a.stats.reward_seconds + b.stats.reward_seconds >= 0.05
        assert (a.stats.reward_tokens, b.stats.reward_tokens) == ((2, 6) if report else (0, 0))


def test_too_small_a_budget_says_what_would_fit(tokenizer, llama):
    per_token = kv_bytes_per_token(llama.config, llama.dtype)
    width = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    needed = len(PROMPTS) * (width + 3) * per_token  # one row per prompt up to min_tokens=4
    with pytest.raises(ValueError, match=f"need at least {needed} bytes"):
        speculative_rejection(llama, tokenizer, CONSTANT, PROMPTS, n=2,
                              schedule=MemorySchedule(budget_bytes=needed - 1, min_tokens=4))  # fmt: skip
    with pytest.raises(ValueError, match=f"it fits n<=2 .* at least {4 * needed} bytes"):
        speculative_rejection(llama, tokenizer, CONSTANT, PROMPTS, n=4,
                              schedule=MemorySchedule(budget_bytes=2 * needed + 1, min_tokens=4))  # fmt: skip


# ------------------------------------------------------------------------------ CUDA (pytest -m cuda)


def cuda_models():
    tokenizer = make_tokenizer()
    return tokenizer, [build(tokenizer).cuda() for build in ARCHITECTURES]


@pytest.mark.cuda
def test_cuda_greedy_equals_generate_with_and_without_graphs():
    tokenizer, models = cuda_models()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for model in models:
        expected = greedy_generate(model, tokenizer, ids, 20)
        for graphs in (True, False):
            options = DecodeOptions(cuda_graphs=graphs, graph_bucket=8, sync_every=4)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed graph capture warns: fail instead
                results = best_of_n(model, tokenizer, CONSTANT, PROMPTS, n=1, decode_options=options,
                                    sampling=SamplingParams(temperature=0, max_new_tokens=20))  # fmt: skip
            assert [r.candidates[0].token_ids for r in results] == expected


@pytest.mark.cuda
def test_cuda_graph_logits_equal_eager_logits():
    tokenizer, models = cuda_models()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for model in models:
        with torch.inference_mode():
            graphed = prefill(model, ids, n=2, capacity=40, decode_options=DecodeOptions(graph_bucket=8))
            eager = prefill(model, ids, n=2, capacity=40, decode_options=DecodeOptions(cuda_graphs=False))
            for step in range(12):
                tokens = torch.randint(4, len(tokenizer), (graphed.num_slots,), device="cuda")
                graphed.step(tokens)
                eager.step(tokens)
                assert graphed.graphs.graphs  # really replayed from a graph
                torch.testing.assert_close(graphed.logits, eager.logits, rtol=1e-4, atol=1e-4)
                if step == 5:
                    keep = torch.tensor([0, 3, 4])
                    graphed.resize(keep, 30)
                    eager.resize(keep, 30)


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_decoding_has_no_host_sync_between_read_backs(graphs):
    """DecodeOptions(debug_syncs=True) turns any sync between two read-backs into an error."""
    tokenizer, models = cuda_models()
    options = DecodeOptions(cuda_graphs=graphs, graph_bucket=8, sync_every=5, debug_syncs=True)
    for model in models:
        events = []
        speculative_rejection(model, tokenizer, HASH_REWARD, PROMPTS, n=4, alpha=0.5, schedule=FixedSchedule([6]),
                              sampling=SamplingParams(max_new_tokens=16), decode_options=options, observer=events.append)  # fmt: skip
        assert [e.step for e in events] == list(range(1, len(events) + 1))
        best_of_n(model, tokenizer, HASH_REWARD, PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=16), decode_options=options)


@pytest.mark.cuda
def test_cuda_memory_schedule_stays_within_the_budget():
    tokenizer, models = cuda_models()
    model = models[0]
    per_token = kv_bytes_per_token(model.config, model.dtype)
    width = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    budget = len(PROMPTS) * 8 * (width + 3) * per_token
    events = []
    speculative_rejection(model, tokenizer, HASH_REWARD, PROMPTS, n=8, alpha=0.5,
                          schedule=MemorySchedule(budget_bytes=budget, min_tokens=2),
                          sampling=SamplingParams(max_new_tokens=40), observer=events.append)  # fmt: skip
    assert sum(e.decision for e in events) >= 2
    assert max(e.kv_reserved_bytes for e in events) <= budget


def test_memory_schedule_decides_when_the_sampled_tokens_would_pass_the_budget():
    """``sequence_length`` counts the token just sampled (as in StepEvent): appending it needs
    ``live_rows x sequence_length x b`` bytes, and the paper decides when that passes the budget."""
    from lightning_sr.generation import DecodeState

    schedule = MemorySchedule(budget_bytes=None, min_tokens=3)
    fits = 4 * 10 * 3  # 4 live rows x (W + t = 10) columns x 3 bytes per token

    def state(step, budget):
        return DecodeState(step=step, sequence_length=7 + step, live_rows=4, num_prompts=2, kv_bytes_per_token=3,
                           kv_budget_bytes=budget)  # fmt: skip

    assert not schedule.should_decide(state(3, fits))  # exactly fits: keep decoding
    assert schedule.should_decide(state(3, fits - 1))
    assert not schedule.should_decide(state(2, 1))  # before min_tokens: never
    assert not schedule.should_decide(state(3, None))
