"""JSONLPredictionWriter: predictions appended per batch to a JSONL file, resumable by id."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn


class JSONLPredictionWriter(BasePredictionWriter):
    """Appends one JSON line per prompt after every predict batch, and flushes it to disk.

    A killed run loses at most the batch in flight. With ``resume=True`` (default), prompts whose
    ``id`` is already in the output are removed from each batch before ``predict_step`` sees it,
    so a restarted run finishes only the rest and the file ends with every prompt exactly once.
    With ``resume=False`` an existing output is kept, renamed with a timestamp, never overwritten.

    Under several processes each rank appends to its own ``<name>.rank<k>.jsonl`` beside the
    output; at the end of predict rank 0 merges them into the output and removes them. At the end
    it prints where the outputs are and a summary (prompts, mean reward, tokens, seconds).

    Predictions must be dicts with an ``"id"`` (as ``SpeculativeRejectionModule`` returns) or
    lists of them.
    """

    def __init__(self, output_path: str = "predictions.jsonl", resume: bool = True):
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.resume = resume
        self.completed_ids: set = set()
        self._file = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_path=str(self.output_path))

    def rank_path(self, rank: int) -> Path:
        return self.output_path.with_name(f"{self.output_path.stem}.rank{rank}{self.output_path.suffix}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            if not self.resume:
                self._back_up_old_outputs()
            elif self._rank_files():  # left by an interrupted multi-process run
                self._merge_rank_files()
            else:
                read_jsonl(self.output_path, repair=True)
        trainer.strategy.barrier("jsonl_writer_setup")
        self.completed_ids = {record["id"] for record in read_jsonl(self.output_path)} if self.resume else set()
        if self.completed_ids:
            rank_zero_info(f"Resuming: {len(self.completed_ids)} prompts already in {self.output_path} are skipped")
        path = self.rank_path(trainer.global_rank) if trainer.world_size > 1 else self.output_path
        self._file = open(path, "a", encoding="utf-8")
        self._started = time.perf_counter()

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.completed_ids and isinstance(batch, list):
            batch[:] = [item for item in batch if not (isinstance(item, dict) and item.get("id") in self.completed_ids)]

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        records = prediction if isinstance(prediction, list) else [prediction]
        for record in records:
            if not isinstance(record, dict) or "id" not in record:
                raise TypeError(f"JSONLPredictionWriter needs dict predictions with an 'id', got {type(record).__name__}")
            self._file.write(json.dumps(_without_nan(record), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()
        if trainer.world_size > 1:
            trainer.strategy.barrier("jsonl_writer_merge")
            if trainer.is_global_zero:
                self._merge_rank_files()
            trainer.strategy.barrier("jsonl_writer_merged")
        if trainer.is_global_zero:
            print(summary(self.output_path, time.perf_counter() - self._started))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _back_up_old_outputs(self) -> None:
        """``resume=False``: earlier outputs are renamed with a timestamp, never overwritten."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in [self.output_path, *self._rank_files()]:
            if path.exists():
                backup = path.with_name(f"{path.name}.{stamp}.bak")
                path.rename(backup)
                rank_zero_warn(f"resume=False: the existing {path} was kept as {backup}")

    def _rank_files(self) -> list[Path]:
        return sorted(self.output_path.parent.glob(f"{self.output_path.stem}.rank*{self.output_path.suffix}"))

    def _merge_rank_files(self) -> None:
        """Fold every rank file into the output (first occurrence of an id wins), atomically."""
        records, seen = [], set()
        for path in [self.output_path, *self._rank_files()]:
            for record in read_jsonl(path):
                if record["id"] not in seen:
                    seen.add(record["id"])
                    records.append(record)
        scratch = self.output_path.with_name(self.output_path.name + ".merging")
        with open(scratch, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, self.output_path)
        for path in self._rank_files():
            path.unlink()


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL output. A torn last line (a run killed mid-write) is dropped, and with
    ``repair`` cut from the file so later appends stay valid; a bad line elsewhere is an error."""
    if not path.exists():
        return []
    # Split on "\n" only: JSON text may hold other characters str.splitlines() breaks at.
    text = path.read_text(encoding="utf-8")
    if repair and text and not text.endswith("\n"):
        with open(path, "a", encoding="utf-8") as file:  # the next append must start a new line
            file.write("\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line + "\n" for line in lines]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON; fix or remove the line to resume") from None
            rank_zero_warn(f"{path}:{number}: dropping a partly written last line")
            if repair:
                with open(path, "r+", encoding="utf-8") as file:
                    file.truncate(sum(len(x.encode("utf-8")) for x in lines[:-1]))
    return records


def _without_nan(value):
    """NaN (a reward model's failure) becomes null, so the output stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value


def summary(path: Path, seconds: float) -> str:
    """Where the outputs are, and what they hold."""
    records = read_jsonl(path)
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float)) and not math.isnan(r["reward"])]
    tokens = sum(r.get("stats", {}).get("tokens_generated", 0) for r in records)
    engine_seconds = sum(
        r.get("stats", {}).get("generation_seconds", 0.0) + r.get("stats", {}).get("reward_seconds", 0.0) for r in records
    )
    mean = f"{sum(rewards) / len(rewards):.4f}" if rewards else "n/a"
    return (
        f"\nPredictions: {path.resolve()}\n"
        f"  prompts: {len(records)}  mean reward of chosen responses: {mean}\n"
        f"  tokens generated: {tokens}  generation + reward seconds: {engine_seconds:.1f}  "
        f"this run: {seconds:.1f} s"
    )
