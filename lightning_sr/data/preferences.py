"""Preference pairs from JSONL files, tokenized for DPO / IPO / KTO training.

File format: one JSON object per line with ``prompt``, ``chosen`` and ``rejected``. Each is a string
or a list of chat messages (``{"role": ..., "content": ...}``): the prompt's messages are the
conversation so far, the responses' messages are the assistant turn(s) that follow it. Blank lines
are skipped; any other key is ignored.

When the tokenizer has a chat template (and ``chat_template=True``) the prompt is rendered with the
generation prompt and each response as the rest of the rendered conversation, so the response
carries the template's end-of-turn tokens. Without one, the prompt is tokenized as is (with the
tokenizer's special tokens) and the EOS token is appended to each response.

Truncation to ``max_length`` tokens (prompt + response) follows
:mod:`lightning_sr.data.exchanges`: the prompt loses tokens from the left first (keeping at least
``max_prompt_length``), then both responses are cut from the right to the room left.

A pair whose chosen and rejected responses are the same text has a zero DPO / IPO gradient: it
would cost compute and teach nothing, silently. Reading a file with such pairs warns once, with
their count and the first one's ``file:line``; they are kept, so that the data's order and the
validation split do not change.

A batch of ``B`` pairs holds ``2B`` rows, chosen rows first then rejected rows, so that each model
runs one forward over both; ``loss_mask`` marks the response tokens. It also holds ``B`` mismatched
rows (prompt ``i`` followed by the chosen response of pair ``i+1``, cyclically) for KTO's KL
estimate; with ``B = 1`` that row is the pair's own chosen response, so KTO wants ``B >= 2``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from lightning_sr.chat import encode_exchange
from lightning_sr.data.exchanges import (
    ExchangeDataModule,
    RecordDataset,
    check_fields,
    check_padding_side,
    check_text,
    pad_rows,
    truncate_exchange,
)
from lightning_sr.jsonl import read_objects

__all__ = [
    "PreferenceRecord", "read_preferences", "truncate_pair", "PreferenceTokenizer", "PreferenceDataset",
    "PreferenceCollator", "PreferenceDataModule", "pad_rows",
]

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Any
    chosen: Any
    rejected: Any
    source: str
    """``file:line`` the record came from, for error messages."""


def _same_response(chosen: Any, rejected: Any) -> bool:
    """Whether two responses are the same text (strings compared without surrounding space)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return chosen.strip() == rejected.strip()
    return chosen == rejected


def read_preferences(path) -> list[PreferenceRecord]:
    """Read and check a preference JSONL file; errors name the file and the 1-based line.

    Warns once (count and first ``file:line``) when pairs have ``chosen == rejected``.
    """
    records = []
    for lineno, row in read_objects(path):
        where = f"{path}:{lineno}"
        check_fields(row, FIELDS, where)
        check_text(row["prompt"], "prompt", where, allow_empty=True)
        check_text(row["chosen"], "chosen", where, allow_empty=False)
        check_text(row["rejected"], "rejected", where, allow_empty=False)
        records.append(PreferenceRecord(row["prompt"], row["chosen"], row["rejected"], where))
    if not records:
        raise ValueError(f"{path}: no preference pairs in file")
    same = [r.source for r in records if _same_response(r.chosen, r.rejected)]
    if same:
        warnings.warn(
            f"{len(same)} preference pair(s) have the same chosen and rejected response (first at "
            f"{same[0]}): they give no DPO / IPO gradient and only cost compute; remove them",
            UserWarning,
            stacklevel=2,
        )
    return records


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int]]:
    """The truncation policy of :mod:`lightning_sr.data.exchanges` applied to a pair."""
    prompt, (chosen, rejected) = truncate_exchange(prompt, [chosen, rejected], max_length, max_prompt_length)
    return prompt, chosen, rejected


class PreferenceTokenizer:
    """Renders (chat template or plain text) and tokenizes one record into id lists."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template

    def _render(self, record: PreferenceRecord) -> tuple[list[int], list[int], list[int]]:
        replies = []
        for field in ("chosen", "rejected"):
            try:
                prompt, reply = encode_exchange(self.tokenizer, record.prompt, getattr(record, field), self.chat_template)
            except ValueError as error:
                raise ValueError(f"{record.source}: field {field!r}: {error}") from None
            replies.append(reply)
        return prompt, replies[0], replies[1]

    def __call__(self, record: PreferenceRecord) -> dict:
        prompt, chosen, rejected = self._render(record)
        if not prompt:
            raise ValueError(f"{record.source}: the prompt is empty after tokenization")
        if not chosen or not rejected:
            raise ValueError(f"{record.source}: a response is empty after tokenization")
        prompt, chosen, rejected = truncate_pair(
            prompt, chosen, rejected, self.max_length, self.max_prompt_length
        )
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


PreferenceDataset = RecordDataset
"""Preference records, encoded on access (kept under this name for existing imports)."""


class PreferenceCollator:
    """Builds the ``2B`` chosen+rejected rows and the ``B`` mismatched KL rows of a batch."""

    def __init__(self, pad_id: int, max_length: int, padding_side: str = "right"):
        check_padding_side(padding_side)
        self.pad_id, self.max_length, self.padding_side = pad_id, max_length, padding_side

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        rows += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        batch = pad_rows(rows, self.pad_id, self.padding_side)
        n = len(examples)
        kl_rows = []
        for i, e in enumerate(examples):
            other = examples[(i + 1) % n]["chosen_ids"]
            kl_rows.append((e["prompt_ids"], other[: self.max_length - len(e["prompt_ids"])]))
        batch.update({f"kl_{k}": v for k, v in pad_rows(kl_rows, self.pad_id, self.padding_side).items()})
        return batch


class PreferenceDataModule(ExchangeDataModule):
    """Preference pairs from a JSONL file (format and truncation policy: see the module docstring).

    Args:
        path: training JSONL file.
        tokenizer: the policy's tokenizer: a hub id, local folder or embedded name, or a
            tokenizer object. None (the default) is the module's ``policy``'s, taken in ``setup``.
        val_path: optional validation JSONL file.
        val_fraction: when no ``val_path``, hold out this fraction of ``path`` (at least one pair,
            chosen with ``seed``) for validation; 0 means no validation.
        max_length: maximum prompt + response tokens per row.
        max_prompt_length: the prompt keeps at least this many tokens when truncated (default
            ``max_length // 2``).
        batch_size: pairs per training step (each pair is two sequences).
        num_workers: DataLoader worker processes.
        chat_template: apply the tokenizer's chat template when it has one.
        padding_side: ``"right"`` (default) or ``"left"``; the log-probs do not depend on it.
        seed: seed of the validation split and of the training order.
        order_seed: seed of the training order alone (None: ``seed``): the same held-out split
            with the training pairs in another order.
    """

    @override
    def read(self, path: str) -> list[PreferenceRecord]:
        return read_preferences(path)

    @override
    def encoder(self) -> PreferenceTokenizer:
        return PreferenceTokenizer(self.tokenizer, self.max_length, self.max_prompt_length, self.chat_template)

    @override
    def collator(self, pad_id: int) -> PreferenceCollator:
        return PreferenceCollator(pad_id, self.max_length, self.padding_side)

    @override
    def drop_last(self) -> bool:
        # A last batch of one pair would give KTO no mismatched pair for its KL estimate.
        return self.batch_size > 1 and len(self.train_set) % self.batch_size == 1
