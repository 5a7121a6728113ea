"""PromptDataModule: prompts for ``predict`` from a JSONL or plain-text file, resumable by id."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_sr.jsonl import read_lines, read_objects, read_records
from lightning_sr.lightning_packages import LightningDataModule

log = logging.getLogger(__name__)


def read_prompts(path: str | Path, prompt_field: str = "prompt", id_field: str = "id") -> list[dict]:
    """Prompts as ``{"id", "prompt", "index", "line"}`` items (``index``: position among the prompts).

    ``.jsonl`` / ``.json`` files hold one JSON object per line; a prompt is a non-blank string or
    a list of chat messages, and a line without ``id_field`` takes its line number as id. Any other
    file is plain text, one prompt per line, ids are line numbers. Blank lines are skipped. A bad
    line (not JSON, no prompt, a blank prompt, an id that is not a string or an integer, a repeated
    id: outputs are keyed by id) is an error naming the file and line.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        rows = ((number, _parse(path, number, record, prompt_field, id_field)) for number, record in read_objects(path))
    else:
        rows = ((number, (number, line.strip())) for number, line in read_lines(path))
    items, seen = [], {}
    for number, (prompt_id, prompt) in rows:
        if prompt_id in seen:
            raise ValueError(f"{path}:{number}: id {prompt_id!r} already used on line {seen[prompt_id]}")
        seen[prompt_id] = number
        items.append({"id": prompt_id, "prompt": prompt, "index": len(items), "line": number})
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def _parse(path: Path, number: int, record: dict, prompt_field: str, id_field: str) -> tuple[Any, Any]:
    where = f"{path}:{number}"
    if prompt_field not in record:
        raise ValueError(f"{where}: no {prompt_field!r} field")
    prompt = record[prompt_field]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: {prompt_field!r} is blank")
    elif isinstance(prompt, list) and prompt:
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt):
            raise ValueError(f"{where}: chat messages need a 'role' string and a 'content'")
    else:
        raise ValueError(f"{where}: {prompt_field!r} must be a non-blank string or a list of chat messages")
    prompt_id = record.get(id_field, number)
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise ValueError(f"{where}: {id_field!r} must be a string or an integer, got {type(prompt_id).__name__}")
    return prompt_id, prompt


class PromptDataModule(LightningDataModule):
    """Serves prompts to ``Trainer.predict`` in batches of ``{"id", "prompt", "index", "line"}`` dicts.

    Batches are made once, in file order, and keep their composition when a run resumes: with
    ``completed`` set to the prediction file of an earlier run, every batch whose prompts are all
    there is skipped and the others are served whole, so a resumed run generates exactly what an
    uninterrupted one would (the module seeds each batch from its first prompt's ``index``; the
    writer does not write a prompt twice). Under several processes each batch goes to exactly one
    process.

    Args:
        path: JSONL (or JSON-lines ``.json``) file of ``{"id", "prompt"}`` objects, or a plain-text
            file with one prompt per line.
        batch_size: prompts decoded together in one engine call.
        prompt_field: the JSONL field holding the prompt (a string or a list of chat messages).
        id_field: the JSONL field holding the prompt's id (default: the line number).
        limit: use only the first ``limit`` prompts (quick runs); None uses all.
        completed: a predictions JSONL file (the writer's ``output_path``); batches whose prompts
            all appear in it are not served again. None serves everything.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 4,
        prompt_field: str = "prompt",
        id_field: str = "id",
        limit: int | None = None,
        completed: str | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"PromptDataModule: batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"PromptDataModule: limit must be >= 1 or null, got {limit}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"PromptDataModule: path {path!r}: no such file")
        self.path, self.batch_size = path, batch_size
        self.prompt_field, self.id_field, self.limit = prompt_field, id_field, limit
        self.completed = completed
        self.prompts: list[dict] | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and check the prompt file (once)."""
        if self.prompts is None:
            self.prompts = read_prompts(self.path, self.prompt_field, self.id_field)[: self.limit]

    def batches(self) -> list[list[dict]]:
        """The batches still to generate (:meth:`remaining`); a resumed run logs how many are left."""
        todo = self.remaining()
        total = math.ceil(len(self.prompts) / self.batch_size)
        if len(todo) < total:
            left = sum(len(batch) for batch in todo)
            log.info(
                "Resuming: %d of %d prompts are already in %s; %s",
                len(self.prompts) - left, len(self.prompts), self.completed,
                f"{left} left in {len(todo)} of {total} batches" if todo else
                "nothing left to do (delete the file, or set resume: false on the writer, to run again)",
            )
        return todo

    def remaining(self) -> list[list[dict]]:
        """The batches still to generate (all of them unless ``completed`` holds some), said nowhere.

        The ``lightning-sr`` command asks it before predict, so that a finished run stops before
        any model loads.
        """
        self.setup()
        size = self.batch_size
        batches = [self.prompts[i : i + size] for i in range(0, len(self.prompts), size)]
        done = {record.get("id") for record in read_records(self.completed)} if self.completed else set()
        return [batch for batch in batches if not all(item["id"] in done for item in batch)]

    @override
    def predict_dataloader(self) -> DataLoader:
        """The batches still to generate (:meth:`batches`), one loader element per batch."""
        # Each element is a whole batch, so batches keep their composition on any number of processes.
        return DataLoader(self.batches(), batch_size=1, shuffle=False, collate_fn=_unwrap)


def _unwrap(elements: list[list[dict]]) -> list[dict]:
    """The one element of a loader batch: one of our prompt batches."""
    return elements[0]
