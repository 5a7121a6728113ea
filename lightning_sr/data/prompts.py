"""PromptDataModule: prompts for ``predict`` from a JSONL or plain-text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader


def read_prompts(path: str | Path, prompt_field: str = "prompt", id_field: str = "id") -> list[dict]:
    """Prompts as ``{"id", "prompt"}`` items.

    ``.jsonl`` / ``.json`` files hold one JSON object per line; a prompt is a string or a list of
    chat messages, and a line without ``id_field`` takes its line number as id. Any other file is
    plain text, one prompt per line, ids are line numbers. Blank lines are skipped. A line that is
    not valid JSON or lacks the prompt field is an error naming the file and line; so is a
    repeated id (outputs are keyed by id).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    items, seen = [], {}
    jsonl = path.suffix in (".jsonl", ".json")
    # Split on "\n" only: JSON text may hold characters that str.splitlines() breaks at.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if jsonl:
            item = _parse_line(path, number, line, prompt_field, id_field)
        else:
            item = {"id": number, "prompt": line.strip()}
        if item["id"] in seen:
            raise ValueError(f"{path}:{number}: id {item['id']!r} already used on line {seen[item['id']]}")
        seen[item["id"]] = number
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _parse_line(path: Path, number: int, line: str, prompt_field: str, id_field: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or prompt_field not in record:
        raise ValueError(f"{path}:{number}: no {prompt_field!r} field")
    prompt = record[prompt_field]
    if not isinstance(prompt, (str, list)) or not prompt:
        raise ValueError(f"{path}:{number}: {prompt_field!r} must be a non-empty string or list of chat messages")
    if isinstance(prompt, list) and not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError(f"{path}:{number}: chat messages need 'role' and 'content'")
    return {"id": record.get(id_field, number), "prompt": prompt}


class PromptDataModule(pl.LightningDataModule):
    """Serves prompts to ``Trainer.predict`` in batches of ``{"id", "prompt"}`` dicts.

    Under several processes Lightning gives each prompt to exactly one process (its predict
    sampler does not pad with duplicates).

    Args:
        path: JSONL (or JSON-lines ``.json``) or plain-text file.
        batch_size: prompts decoded together in one engine call.
        prompt_field, id_field: JSONL field names.
        limit: use only the first ``limit`` prompts (quick runs).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 4,
        prompt_field: str = "prompt",
        id_field: str = "id",
        limit: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size = path, batch_size
        self.prompt_field, self.id_field, self.limit = prompt_field, id_field, limit
        self.prompts: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.prompts is None:
            self.prompts = read_prompts(self.path, self.prompt_field, self.id_field)[: self.limit]

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.prompts, batch_size=self.batch_size, shuffle=False, collate_fn=list)
