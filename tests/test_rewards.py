"""Reward models: HF sequence classifiers with their own tokenizer, plain functions."""

import pytest
import torch
from lightning_sr.testing import CHAT_TEMPLATE, make_tokenizer, save_tiny_reward, tiny_llama, tiny_reward_model
from transformers import BertConfig, BertForSequenceClassification

from lightning_sr.generation import FixedSchedule, SamplingParams, speculative_rejection
from lightning_sr.rewards import FunctionReward, HFRewardModel, RewardModel

PROMPTS = ["THANKS", "PLEASE HELP", "THE DAY"]
RESPONSES = ["GOOD DAY FRIEND", "NO", "I LOVE THIS CITY VERY VERY MUCH , THANKS"]


def test_loads_from_a_local_path_like_from_an_object(tmp_path):
    model, tokenizer = tiny_reward_model()
    save_tiny_reward(tmp_path / "rm")
    by_object = HFRewardModel(model, tokenizer).score(PROMPTS, RESPONSES)
    by_path = HFRewardModel(str(tmp_path / "rm")).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(by_object, by_path)
    assert by_object.shape == (3,) and by_object.dtype == torch.float32


def test_batching_under_a_token_budget_does_not_change_scores():
    model, tokenizer = tiny_reward_model()
    one_by_one = HFRewardModel(model, tokenizer, max_batch_tokens=1).score(PROMPTS, RESPONSES)
    together = HFRewardModel(model, tokenizer, max_batch_tokens=10_000).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-5)
    reward = HFRewardModel(model, tokenizer)
    reward.score(PROMPTS, RESPONSES)
    assert reward.last_token_counts == [len(ids) for ids in reward.encode(PROMPTS, RESPONSES)]


def test_chat_template_renders_prompt_and_response_as_turns():
    model, tokenizer = tiny_reward_model()
    tokenizer.chat_template = CHAT_TEMPLATE
    reward = HFRewardModel(model, tokenizer)
    (ids,) = reward.encode(["HELP"], ["GOOD DAY"])
    text = "<s> user HELP </s> <s> assistant GOOD DAY </s> "
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "system", "content": "BE KIND"}, {"role": "user", "content": "HELP"}]
    (ids,) = reward.encode([messages], ["YES"])
    assert ids == tokenizer("<s> system BE KIND </s> <s> user HELP </s> <s> assistant YES </s> ", add_special_tokens=False)["input_ids"]


def test_several_labels_need_a_label_index():
    _, tokenizer = tiny_reward_model()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="2 labels"):
        HFRewardModel(model, tokenizer)
    # The score of each pair is the chosen label's logit on the pair as the reward model encodes it.
    prompts, responses = ["GOOD", "THE DAY"], ["", "I LOVE THIS CITY"]
    for label_index in (0, 1):
        reward = HFRewardModel(model, tokenizer, label_index=label_index)
        logits = torch.stack([
            model(input_ids=torch.tensor([ids])).logits[0] for ids in reward.encode(prompts, responses)
        ])  # fmt: skip
        assert logits.shape == (2, 2) and not torch.allclose(logits[:, 0], logits[:, 1])
        torch.testing.assert_close(reward.score(prompts, responses), logits[:, label_index], rtol=1e-5, atol=1e-5)


def test_model_object_without_tokenizer_is_an_error():
    model, _ = tiny_reward_model()
    with pytest.raises(ValueError, match="needs the reward model's tokenizer"):
        HFRewardModel(model)


def test_reward_model_with_a_different_tokenizer_drives_rejection():
    generator_tokenizer = make_tokenizer()
    generator = tiny_llama(generator_tokenizer)
    model, tokenizer = tiny_reward_model()
    # The reward vocabulary is upper-case: lower-case generator text maps to <unk> except where
    # a FunctionReward upper-cases it first.
    reward = HFRewardModel(model, tokenizer)
    results = speculative_rejection(
        generator, generator_tokenizer, reward, ["thanks", "help"], n=4, alpha=0.5,
        schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=6),
    )
    for result in results:
        expected = reward.score([result.prompt], [result.response])
        assert result.reward == pytest.approx(expected.item(), abs=1e-5)
        assert result.stats.reward_tokens > 0


def test_function_reward_is_a_reward_model():
    reward = FunctionReward(lambda prompt, response: len(response))
    assert isinstance(reward, RewardModel)
    assert reward.score(["a", "b"], ["xy", "xyz"]).tolist() == [2.0, 3.0]
    batched = FunctionReward(lambda prompts, responses: [len(p) for p in prompts], batched=True)
    assert batched.score(["a", "bb"], ["", ""]).tolist() == [1.0, 2.0]
