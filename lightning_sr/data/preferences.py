"""Preference pairs from JSONL files, tokenized for DPO / IPO / KTO training.

File format: one JSON object per line with ``prompt``, ``chosen`` and ``rejected``. Each is a string
or a list of chat messages (``{"role": ..., "content": ...}``): the prompt's messages are the
conversation so far, the responses' messages are the assistant turn(s) that follow it. Blank lines
are skipped; any other key is ignored.

When the tokenizer has a chat template (and ``chat_template=True``) the prompt is rendered with the
generation prompt and each response as the rest of the rendered conversation, so the response
carries the template's end-of-turn tokens. Without one, the prompt is tokenized as is (with the
tokenizer's special tokens) and the EOS token is appended to each response.

Truncation to ``max_length`` tokens (prompt + response), applied to each pair:
  1. the prompt loses tokens from the *left* (the oldest context goes first) until the pair fits,
     but keeps at least ``min(len(prompt), max_prompt_length)`` tokens;
  2. if the pair still does not fit, both responses are cut from the *right* to the room left.

A batch of ``B`` pairs holds ``2B`` rows, chosen rows first then rejected rows, so that each model
runs one forward over both; ``loss_mask`` marks the response tokens. It also holds ``B`` mismatched
rows (prompt ``i`` followed by the chosen response of pair ``i+1``, cyclically) for KTO's KL
estimate; with ``B = 1`` that row is the pair's own chosen response, so KTO wants ``B >= 2``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_sr.chat import encode_exchange
from lightning_sr.data.loaders import training_loader
from lightning_sr.jsonl import read_objects
from lightning_sr.lightning_packages import LightningDataModule
from lightning_sr.loading import load_tokenizer

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Any
    chosen: Any
    rejected: Any
    source: str
    """``file:line`` the record came from, for error messages."""


def _check_text(value: Any, field: str, where: str, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise ValueError(f"{where}: field {field!r} is empty")
        return
    if isinstance(value, list) and value:
        for message in value:
            if not (isinstance(message, dict) and "role" in message and "content" in message):
                raise ValueError(f"{where}: field {field!r} must hold messages with 'role' and 'content'")
        if not allow_empty and not any(str(m["content"]).strip() for m in value):
            raise ValueError(f"{where}: field {field!r} is empty")
        return
    raise ValueError(f"{where}: field {field!r} must be a string or a non-empty list of chat messages")


def read_preferences(path: str | Path) -> list[PreferenceRecord]:
    """Read and check a preference JSONL file; errors name the file and the 1-based line."""
    records = []
    for lineno, row in read_objects(path):
        where = f"{path}:{lineno}"
        missing = [field for field in FIELDS if field not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        _check_text(row["prompt"], "prompt", where, allow_empty=True)
        _check_text(row["chosen"], "chosen", where, allow_empty=False)
        _check_text(row["rejected"], "rejected", where, allow_empty=False)
        records.append(PreferenceRecord(row["prompt"], row["chosen"], row["rejected"], where))
    if not records:
        raise ValueError(f"{path}: no preference pairs in file")
    return records


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Apply the truncation policy described in the module docstring."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_prompt_length))
        prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


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


class PreferenceDataset(Dataset):
    def __init__(self, records: list[PreferenceRecord], encode: PreferenceTokenizer):
        self.records = records
        self.encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.encode(self.records[index])


def pad_rows(
    rows: list[tuple[list[int], list[int]]], pad_id: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """Pad ``(prompt_ids, response_ids)`` rows into input_ids / attention_mask / loss_mask."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        start = width - n if padding_side == "left" else 0
        ids[i, start : start + n] = torch.tensor(prompt + response, dtype=torch.long)
        attention[i, start : start + n] = 1
        loss[i, start + len(prompt) : start + n] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


class PreferenceCollator:
    """Builds the ``2B`` chosen+rejected rows and the ``B`` mismatched KL rows of a batch."""

    def __init__(self, pad_id: int, max_length: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
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


class PreferenceDataModule(LightningDataModule):
    """Preference pairs from a JSONL file (format and truncation policy: see the module docstring).

    Args:
        path: training JSONL file.
        tokenizer: the policy's tokenizer: a hub id, local folder or embedded name (usually the
            same as the module's ``policy``), or a tokenizer object.
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
    """

    def __init__(
        self,
        path: str,
        tokenizer: Any,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        chat_template: bool = True,
        padding_side: str = "right",
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.path, self.val_path, self.val_fraction = path, val_path, val_fraction
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max(1, max_prompt_length or max_length // 2)
        if self.max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({max_length}) "
                "so that responses keep at least one token"
            )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.chat_template, self.padding_side, self.seed = chat_template, padding_side, seed
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self.train_set: PreferenceDataset | None = None
        self.val_set: PreferenceDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer)
        encode = PreferenceTokenizer(self.tokenizer, self.max_length, self.max_prompt_length, self.chat_template)
        train = read_preferences(self.path)
        val: list[PreferenceRecord] = []
        if self.val_path:
            val = read_preferences(self.val_path)
        elif self.val_fraction > 0:
            if len(train) < 2:
                raise ValueError(f"{self.path}: val_fraction needs at least 2 pairs, found {len(train)}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = min(len(train) - 1, max(1, math.ceil(self.val_fraction * len(train))))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        self.train_set = PreferenceDataset(train, encode)
        self.val_set = PreferenceDataset(val, encode) if val else None
        if self.val_set is None:  # no validation: Lightning then skips it instead of warning about it
            self.val_dataloader = None

    def _collator(self) -> PreferenceCollator:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        return PreferenceCollator(pad_id, self.max_length, self.padding_side)

    def train_dataloader(self) -> DataLoader:
        return training_loader(
            self.train_set,
            self.batch_size,
            self.seed,
            self._collator(),
            num_workers=self.num_workers,
            # A last batch of one pair would give KTO no mismatched pair for its KL estimate.
            drop_last=self.batch_size > 1 and len(self.train_set) % self.batch_size == 1,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self._collator(),
        )
