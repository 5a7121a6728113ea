"""A reward model from any ``AutoModelForSequenceClassification`` with its own tokenizer."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lightning_sr.chat import as_messages, prompt_text, uses_chat_template
from lightning_sr.loading import load_sequence_classifier, load_tokenizer


class HFRewardModel:
    """Scores (prompt, response) pairs with a sequence classifier's scalar output.

    The reward model re-tokenizes text with its own tokenizer, so it works with any generator.
    With a chat template (and ``chat_template=True``) the pair is rendered as a user turn and a
    complete assistant turn; otherwise prompt and response are encoded as a text pair. Sequences
    longer than the model's context are truncated (the start of a chat, the longer of a text pair). Pairs are sorted by length and
    batched so that ``rows x longest row <= max_batch_tokens``.

    Args:
        model: a model object, or a hub id / local path (named defaults such as
            ``"minilm-positivity"`` are resolved first).
        tokenizer: the reward model's tokenizer (object or name); defaults to the model's folder.
        device, dtype: where and in which precision to run it (loading by name only for dtype).
        max_batch_tokens: token budget of one forward pass.
        label_index: which output to use when the classifier has several labels.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_tokens: int = 16384,
        label_index: int | None = None,
        chat_template: bool = True,
    ):
        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else model
            model = load_sequence_classifier(model, dtype)
        if tokenizer is None:
            raise ValueError("HFRewardModel needs the reward model's tokenizer when given a model object")
        tokenizer = load_tokenizer(tokenizer)
        num_labels = model.config.num_labels
        if label_index is None and num_labels != 1:
            raise ValueError(
                f"the reward model has {num_labels} labels: pass label_index to choose the one to score"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.label_index = label_index or 0
        self.max_batch_tokens = max_batch_tokens
        self.use_chat_template = uses_chat_template(tokenizer, chat_template)
        self.max_length = _context_length(model, tokenizer)
        self.last_token_counts: list[int] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "HFRewardModel":
        self.model.to(device)
        return self

    def encode(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each (prompt, response) pair as the reward model reads it."""
        encoded = []
        for prompt, response in zip(prompts, responses):
            if self.use_chat_template:
                messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(
                    prompt_text(prompt), response, truncation=True, max_length=self.max_length
                )["input_ids"]
            encoded.append(list(ids[-self.max_length :]))
        return encoded

    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        encoded = self.encode(prompts, responses)
        self.last_token_counts = [len(ids) for ids in encoded]
        scores = torch.empty(len(encoded), dtype=torch.float32)
        for batch in _length_batches(encoded, self.max_batch_tokens):
            padded = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            logits = self.model(
                input_ids=padded["input_ids"].to(self.device),
                attention_mask=padded["attention_mask"].to(self.device),
            ).logits
            scores[batch] = logits[:, self.label_index].float().cpu()
        return scores

    def __repr__(self) -> str:
        return f"HFRewardModel({self.model.config.name_or_path or type(self.model).__name__!r})"


def _length_batches(encoded: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that each group's rows x longest row stays within the budget."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches, current = [], []
    for index in order:
        longest = len(encoded[index])  # sorted ascending: the newest row is the longest
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _context_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if x is not None and x < 1_000_000]
    return min(limits) if limits else 512

