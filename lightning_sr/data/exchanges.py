"""What the SFT and preference data modules share: prompt + response rows from JSONL files.

Both train on *exchanges*, a prompt followed by a response, where only the response is learned
(``loss_mask``). This module holds the parts that do not depend on how many responses a record has:

- :func:`check_text`: a field is a string or a list of chat messages (errors name ``file:line``);
- :func:`truncate_exchange`: the truncation policy (below);
- :func:`pad_rows`: padding ``(prompt_ids, response_ids)`` rows into a batch;
- :class:`ExchangeDataModule`: the shared LightningDataModule (reading, validation split, seeded
  and resumable training loader); :class:`~lightning_sr.data.sft.SFTDataModule` and
  :class:`~lightning_sr.data.preferences.PreferenceDataModule` say how to read, encode and collate;
- :func:`check_tokenizer_fits`: the modules' check, at fit start, that the data's tokenizer has no
  id past the model's embeddings.

The tokenizer follows the model: a data module given no ``tokenizer`` loads, in ``setup``, the one
its Trainer's LightningModule names (``tokenizer_name_or_path``: the policy of a
:class:`~lightning_sr.modules.preference.PreferenceModule`, the model of an
:class:`~lightning_sr.modules.sft.SFTModule`), so that changing ``--model.policy`` alone changes
both. A tokenizer given anyway is checked against the model before the first step: an id past the
embeddings would otherwise stop the first forward with "index out of range in self".

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


def describe_source(value: Any) -> str:
    """How a model or tokenizer option's value reads in a message: a name as given, an object by
    its ``name_or_path``, else its type."""
    if isinstance(value, str):
        return value
    return getattr(value, "name_or_path", "") or f"<a {type(value).__name__} object>"


def embedding_rows(model: Any) -> int | None:
    """The rows of ``model``'s input embedding (None without one): the whole count, also when
    FSDP2 has sharded it (its weight is then a ``DTensor``, whose shape is the whole one)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embedding, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_tokenizer_fits(datamodule: Any, model: Any, option: str, source: Any) -> None:
    """Raise ``ValueError`` naming both options when the data module's tokenizer has more ids than
    ``model`` (given by ``option``, e.g. ``"--model.policy"``, as ``source``) has embeddings.

    For the modules' ``on_fit_start``: it stops the run before the first step, where an id past the
    embeddings would end it with "index out of range in self". Nothing is checked without a data
    module with a loaded tokenizer (a Trainer given bare loaders) or a model without input
    embeddings.
    """
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None or isinstance(tokenizer, str) or not hasattr(tokenizer, "__len__"):
        return
    rows = embedding_rows(model)
    if rows is None or len(tokenizer) <= rows:
        return
    role = option.rsplit(".", 1)[-1]
    given = getattr(datamodule, "tokenizer_source", None)
    model_text = f"the {role} ({option}={describe_source(source)}) has {rows} embeddings"
    if given is None:  # the data module took the model's own tokenizer: the model folder disagrees
        raise ValueError(
            f"the {role}'s own tokenizer has {len(tokenizer)} ids but {model_text}: "
            f"set --data.tokenizer to the tokenizer the {role} was trained with"
        )
    raise ValueError(
        f"the data's tokenizer (--data.tokenizer={describe_source(given)}) has {len(tokenizer)} ids but {model_text}: "
        f"leave --data.tokenizer unset to use the {role}'s, or give the tokenizer the {role} was trained with"
    )


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
        tokenizer: the model's tokenizer: a hub id, local folder or embedded name, or a tokenizer
            object. None (the default) takes, in ``setup``, the one the Trainer's LightningModule
            names (its ``tokenizer_name_or_path``: the module's model), so it follows the model.
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
        order_seed: seed of the training order alone (None: ``seed``), so that runs with the same
            held-out split see the training records in different orders (seeds of an experiment).
    """

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        chat_template: bool = True,
        padding_side: str = "right",
        seed: int = 0,
        order_seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        check_padding_side(padding_side)
        self.path, self.val_path, self.val_fraction = path, val_path, val_fraction
        self.tokenizer = tokenizer  # the loaded tokenizer after ``setup``
        self.tokenizer_source = tokenizer  # as given, for messages; None: the module's (module_tokenizer)
        self.max_length = max_length
        self.max_prompt_length = max(1, max_prompt_length or max_length // 2)
        if self.max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({max_length}) "
                "so that responses keep at least one token"
            )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.chat_template, self.padding_side, self.seed = chat_template, padding_side, seed
        self.order_seed = seed if order_seed is None else order_seed
        # A name (or None: the module's) is saved; an object is not (it could not be rebuilt from YAML).
        self.save_hyperparameters(ignore=[] if tokenizer is None or isinstance(tokenizer, str) else ["tokenizer"])
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

    def module_tokenizer(self) -> str:
        """Where the Trainer's LightningModule says its model's tokenizer lives
        (``tokenizer_name_or_path``); ``ValueError`` naming ``--data.tokenizer`` when it cannot say."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        source = getattr(module, "tokenizer_name_or_path", None)
        if source:
            return source
        if module is None:
            why = "there is no LightningModule to take it from"
        elif hasattr(type(module), "tokenizer_name_or_path"):
            why = f"the {type(module).__name__}'s model is an object without a name_or_path"
        else:
            why = f"the {type(module).__name__} does not name one (it has no tokenizer_name_or_path)"
        raise ValueError(f"--data.tokenizer is not set and {why}: set --data.tokenizer")

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer (given, else the module's) and read, check and split the records
        (once, on every process)."""
        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer if self.tokenizer is not None else self.module_tokenizer())
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
            self.order_seed,
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
