"""Supervised fine-tuning data: prompt → response examples from JSONL files.

File format: one JSON object per line with ``prompt`` and ``response``. Each is a string or a list
of chat messages (``{"role": ..., "content": ...}``): the prompt's messages are the conversation so
far (a system message included, if any), the response's messages are the assistant turn(s) that
follow it. Blank lines are skipped; any other key is ignored. A bad line raises ``ValueError``
naming ``file:line``.

Rendering and truncation are those of the preference data (:mod:`lightning_sr.data.exchanges`):
with a chat template the response carries the template's end-of-turn tokens, so the model learns
to stop; the prompt is cut from the left first, then the response from the right. A batch has
``input_ids`` / ``attention_mask`` / ``loss_mask``, with ``loss_mask`` marking the response
tokens: the loss of :class:`~lightning_sr.modules.sft.SFTModule` is on those tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from lightning_sr.chat import encode_exchange
from lightning_sr.data.exchanges import (
    ExchangeDataModule,
    check_fields,
    check_padding_side,
    check_text,
    pad_rows,
    truncate_exchange,
)
from lightning_sr.jsonl import read_objects

__all__ = ["SFTRecord", "read_sft", "SFTTokenizer", "SFTCollator", "SFTDataModule"]

FIELDS = ("prompt", "response")


@dataclass(frozen=True)
class SFTRecord:
    prompt: Any
    response: Any
    source: str
    """``file:line`` the record came from, for error messages."""


def read_sft(path) -> list[SFTRecord]:
    """Read and check an SFT JSONL file; errors name the file and the 1-based line."""
    records = []
    for lineno, row in read_objects(path):
        where = f"{path}:{lineno}"
        check_fields(row, FIELDS, where)
        check_text(row["prompt"], "prompt", where, allow_empty=True)
        check_text(row["response"], "response", where, allow_empty=False)
        records.append(SFTRecord(row["prompt"], row["response"], where))
    if not records:
        raise ValueError(f"{path}: no examples in file")
    return records


class SFTTokenizer:
    """Renders (chat template or plain text), tokenizes and truncates one record."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.chat_template = chat_template

    def __call__(self, record: SFTRecord) -> dict:
        try:
            prompt, response = encode_exchange(self.tokenizer, record.prompt, record.response, self.chat_template)
        except ValueError as error:
            raise ValueError(f"{record.source}: {error}") from None
        if not prompt:
            raise ValueError(f"{record.source}: the prompt is empty after tokenization")
        if not response:
            raise ValueError(f"{record.source}: the response is empty after tokenization")
        prompt, (response,) = truncate_exchange(prompt, [response], self.max_length, self.max_prompt_length)
        return {"prompt_ids": prompt, "response_ids": response}


class SFTCollator:
    """Pads encoded examples into one batch (``loss_mask`` on the response tokens)."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        check_padding_side(padding_side)
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(e["prompt_ids"], e["response_ids"]) for e in examples]
        return pad_rows(rows, self.pad_id, self.padding_side)


class SFTDataModule(ExchangeDataModule):
    """Prompt → response examples from a JSONL file (format: see the module docstring).

    Args:
        path: training JSONL file.
        tokenizer: the model's tokenizer: a hub id, local folder or embedded name, or a
            tokenizer object. None (the default) is the module's ``model``'s, taken in ``setup``.
        val_path: optional validation JSONL file.
        val_fraction: when no ``val_path``, hold out this fraction of ``path`` (at least one
            example, chosen with ``seed``) for validation; 0 means no validation.
        max_length: maximum prompt + response tokens per row.
        max_prompt_length: the prompt keeps at least this many tokens when truncated (default
            ``max_length // 2``).
        batch_size: examples per training step.
        num_workers: DataLoader worker processes.
        chat_template: apply the tokenizer's chat template when it has one.
        padding_side: ``"right"`` (default) or ``"left"``; the loss does not depend on it.
        seed: seed of the validation split and of the training order (a seeded, resumable
            loader: a fit resumed mid-epoch sees the same batches as an uninterrupted one).
        order_seed: seed of the training order alone (None: ``seed``): the same held-out split
            with the training examples in another order.
    """

    @override
    def read(self, path: str) -> list[SFTRecord]:
        return read_sft(path)

    @override
    def encoder(self) -> SFTTokenizer:
        return SFTTokenizer(self.tokenizer, self.max_length, self.max_prompt_length, self.chat_template)

    @override
    def collator(self, pad_id: int) -> SFTCollator:
        return SFTCollator(pad_id, self.padding_side)
