"""What the SFT and preference data modules share: prompt + response rows from JSONL files.

Both train on *exchanges*, a prompt followed by a response, where only the response is learned
(``loss_mask``). This module holds the parts that do not depend on how many responses a record has:

- :func:`check_text`: a field is a string or a list of chat messages (errors name ``file:line``);
- :func:`truncate_exchange`: the truncation policy (below);
- :func:`pad_rows`: padding ``(prompt_ids, response_ids)`` rows into a batch;
- :class:`ExchangeDataModule`: the shared LightningDataModule (reading, validation split, seeded
  and resumable training loader); :class:`~lightning_sr.data.sft.SFTDataModule` and
  :class:`~lightning_sr.data.preferences.PreferenceDataModule` say how to read, encode and collate.

Rendering: with a chat template (and ``chat_template=True``) the prompt is rendered with the
generation prompt and the response as the rest of the conversation, so it carries the template's
end-of-turn tokens; without one the prompt is tokenized as is and the EOS token ends the response
(:func:`lightning_sr.chat.encode_exchange`).

Truncation to ``max_length`` tokens (prompt + response), applied to each record:
  1. the prompt loses tokens from the *left* (the oldest context goes first) until the record fits,
     but keeps at least ``min(len(prompt), max_prompt_length)`` tokens;
  2. if it still does not fit, the response(s) are cut from the *right* to the room left.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_sr.data.loaders import training_loader
from lightning_sr.lightning_packages import LightningDataModule
from lightning_sr.loading import load_tokenizer


def check_text(value: Any, field: str, where: str, allow_empty: bool) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is a string or a list of chat messages."""
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


def check_fields(row: dict, fields: tuple[str, ...], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the missing fields of a JSONL object."""
    missing = [field for field in fields if field not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")


def truncate_exchange(
    prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation policy of the module docstring to a prompt and its response(s)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_prompt_length))
        prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses]


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


def check_padding_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else EOS."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad_id


class RecordDataset(torch.utils.data.Dataset):
    """Records encoded on access by ``encode`` (a record → a dict of id lists)."""

    def __init__(self, records: list, encode: Callable[[Any], dict]):
        self.records = records
        self.encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.encode(self.records[index])


class ExchangeDataModule(LightningDataModule):
    """Shared LightningDataModule of prompt + response records read from JSONL files.

    Subclasses define ``read(path) -> list of records`` (errors naming ``file:line``),
    ``encoder() -> record -> dict`` and ``collator(pad_id) -> list of dicts -> batch``, and may
    override ``drop_last()``.

    Args:
        path: training JSONL file.
        tokenizer: the model's tokenizer: a hub id, local folder or embedded name (usually the
            same as the module's model), or a tokenizer object.
        val_path: optional validation JSONL file.
        val_fraction: when no ``val_path``, hold out this fraction of ``path`` (at least one
            record, chosen with ``seed``) for validation; 0 means no validation.
        max_length: maximum prompt + response tokens per row.
        max_prompt_length: the prompt keeps at least this many tokens when truncated (default
            ``max_length // 2``).
        batch_size: records per training step.
        num_workers: DataLoader worker processes.
        chat_template: apply the tokenizer's chat template when it has one.
        padding_side: ``"right"`` (default) or ``"left"``; the losses do not depend on it.
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
        check_padding_side(padding_side)
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
        self.train_set: RecordDataset | None = None
        self.val_set: RecordDataset | None = None

    # ------------------------------------------------------------------ what subclasses define
    def read(self, path: str) -> list:
        """The checked records of one JSONL file (errors name ``file:line``)."""
        raise NotImplementedError

    def encoder(self) -> Callable[[Any], dict]:
        """What turns one record into a dict of token-id lists (run on access: in the loader's
        workers when it has any)."""
        raise NotImplementedError

    def collator(self, pad_id: int) -> Callable[[list[dict]], dict]:
        """What pads encoded records into one batch of tensors."""
        raise NotImplementedError

    def drop_last(self) -> bool:
        """Whether the training loader drops its last, incomplete batch."""
        return False

    # ------------------------------------------------------------------ shared
    def split(self, records: list) -> tuple[list, list]:
        """``(train, validation)``: a seeded ``val_fraction`` of ``records`` held out, order kept."""
        if self.val_fraction <= 0:
            return records, []
        if len(records) < 2:
            raise ValueError(f"{self.path}: val_fraction needs at least 2 records, found {len(records)}")
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = min(len(records) - 1, max(1, math.ceil(self.val_fraction * len(records))))
        return [records[i] for i in sorted(order[n_val:])], [records[i] for i in sorted(order[:n_val])]

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and read, check and split the records (once, on every process)."""
        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer)
        encode = self.encoder()
        if self.val_path:
            train, val = self.read(self.path), self.read(self.val_path)
        else:
            train, val = self.split(self.read(self.path))
        self.train_set = RecordDataset(train, encode)
        self.val_set = RecordDataset(val, encode) if val else None
        if self.val_set is None:  # no validation: Lightning then skips it instead of warning about it
            self.val_dataloader = None

    @override
    def train_dataloader(self) -> DataLoader:
        """The training records in a seeded order that checkpoints resume
        (:func:`~lightning_sr.data.loaders.training_loader`)."""
        return training_loader(
            self.train_set,
            self.batch_size,
            self.seed,
            self.collator(pad_token_id(self.tokenizer)),
            num_workers=self.num_workers,
            drop_last=self.drop_last(),
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """The validation records in file order."""
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collator(pad_token_id(self.tokenizer)),
        )
