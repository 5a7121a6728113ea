"""JSONLPredictionWriter: predictions appended per batch to a JSONL file, each prompt exactly once."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from typing_extensions import override

from lightning_sr.jsonl import dumps, read_records
from lightning_sr.lightning_packages import BasePredictionWriter

log = logging.getLogger(__name__)

RANK_FILE_HEADER = "lightning_sr_rank_file"
"""Key of the first line of a per-process file: a file is merged only if it starts with it."""


class JSONLPredictionWriter(BasePredictionWriter):
    """Appends one strict-JSON line per prompt after every predict batch and syncs it to disk.

    A killed run loses at most the batch in flight (a torn last line is cut off on the next
    start). A prompt whose id is already in the output is never written again, so a rerun ends
    with every prompt exactly once; pair it with ``PromptDataModule(completed=<output_path>)``,
    which does not serve finished batches again. With ``resume=False`` an existing output is kept
    under a timestamped name and a new file is started, never overwritten. Non-finite numbers
    (a reward of ``NaN`` or ``inf``) are written as ``null`` and counted in the summary.

    Under several processes each process appends to its own hidden file
    ``.<name>.rank<k>.part`` beside the output; at the end of predict (or at the start of the
    next run, if one was killed) the first process merges them into the output and removes them.
    Only files with that exact name *and* our header line are merged: nothing of the user's is
    read, merged or deleted. At the end it prints where the output is and a summary.

    A run whose output is of no use says so in :attr:`problem` and in a logged warning: nothing
    written although batches were served (every prompt skipped), or every reward written NaN.
    The ``lightning-sr`` command ends such a run with that reason and exit status 1.

    Args:
        output_path: the JSONL file to append predictions to (its folder is created).
        resume: keep and extend an existing output (True), or set it aside and start afresh.

    Predictions must be dicts with an ``"id"`` (as ``SpeculativeRejectionModule`` returns them)
    or lists of them.
    """

    def __init__(self, output_path: str = "predictions.jsonl", resume: bool = True):
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.resume = resume
        self._file = None
        self._written: set = set()
        self._counts = _no_counts()
        self.summary: str | None = None
        """The end-of-run summary (rank 0), printed at predict end unless ``print_summary`` is off."""
        self.problem: str | None = None
        """Why this run's output is of no use (every process), or None; see :func:`problem_of`."""
        self.print_summary = True
        """Print the summary, and warn of a problem, at predict end; the lightning-sr command turns
        it off to report both itself, below the progress bar."""

    @property
    @override
    def state_key(self) -> str:
        """One writer's state per output file, so that two writers in one Trainer do not collide."""
        return self._generate_state_key(output_path=str(self.output_path))

    def rank_path(self, rank: int) -> Path:
        """The per-process file of ``rank`` in a multi-process run."""
        return self.output_path.with_name(f".{self.output_path.name}.rank{rank}.part")

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Before predict: rank 0 sets earlier outputs aside (``resume=False``) or repairs and merges
        what a killed run left; then every process reads the ids already written and opens its file."""
        if stage != "predict":
            return
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            if not self.resume:
                self._set_aside_old_outputs()
            self._merge_rank_files()  # left by a killed multi-process run; also repairs a torn line
        trainer.strategy.barrier("jsonl_writer_setup")
        self._written = {record.get("id") for record in read_records(self.output_path)}
        self._counts = _no_counts()
        self.summary = self.problem = None
        self._started = time.perf_counter()
        if trainer.world_size == 1:
            self._file = open(self.output_path, "a", encoding="utf-8")
        else:
            path = self.rank_path(trainer.global_rank)
            self._file = open(path, "a", encoding="utf-8")
            if self._file.tell() == 0:
                header = {RANK_FILE_HEADER: {"output": self.output_path.name, "rank": trainer.global_rank}}
                self._append([json.dumps(header)])

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        """Append the batch's predictions whose ids are not in the output yet, synced to disk."""
        self._counts["batches"] += 1
        lines = []
        for record in prediction if isinstance(prediction, list) else [prediction]:
            if not isinstance(record, dict) or "id" not in record:
                raise TypeError(f"JSONLPredictionWriter needs dict predictions with an 'id', got {type(record).__name__}")
            if record["id"] in self._written:
                self._counts["duplicates"] += 1
                continue
            line, nonfinite = dumps(record)
            lines.append(line)
            self._written.add(record["id"])
            self._counts["written"] += 1
            self._counts["nonfinite"] += nonfinite
            self._counts["null_rewards"] += "reward" in record and not _finite(record["reward"])
        self._append(lines)

    @override
    def on_predict_end(self, trainer, pl_module) -> None:
        """Close the file, merge the per-process files (rank 0), make the summary and name a problem."""
        self._close()
        counts = self._counts
        if trainer.world_size > 1:
            trainer.strategy.barrier("jsonl_writer_merge")
            if trainer.is_global_zero:
                self._merge_rank_files()
            trainer.strategy.barrier("jsonl_writer_merged")
            counts = _summed(trainer, counts)
        self.problem = problem_of(self.output_path, counts)
        if trainer.is_global_zero:
            self.summary = summary(self.output_path, counts, time.perf_counter() - self._started)
            if self.print_summary:
                print(self.summary)
                if self.problem:
                    log.warning("%s", self.problem[0].upper() + self.problem[1:])

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _append(self, lines: list[str]) -> None:
        if lines:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _set_aside_old_outputs(self) -> None:
        """``resume=False``: earlier outputs are renamed with a timestamp, never overwritten."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in [self.output_path, *self._rank_files()]:
            if path.exists():
                kept = path.with_name(f"{path.name}.{stamp}.bak")
                path.rename(kept)
                log.warning("resume=False: the existing %s was kept as %s", path, kept)

    def _rank_files(self) -> list[Path]:
        """Our per-process files for this output: the exact name pattern and our header line."""
        found = []
        for path in sorted(self.output_path.parent.glob(f".{self.output_path.name}.rank*.part")):
            suffix = path.name[len(f".{self.output_path.name}.rank") : -len(".part")]
            if suffix.isdigit() and _first_line_is_header(path):
                found.append(path)
        return found

    def _merge_rank_files(self) -> None:
        """Fold the per-process files into the output (an id's first record wins), atomically."""
        rank_files = self._rank_files()
        records, seen = [], set()
        for path in [self.output_path, *rank_files]:
            for record in read_records(path, repair=path == self.output_path):
                if RANK_FILE_HEADER in record or "id" not in record or record["id"] in seen:
                    continue
                seen.add(record["id"])
                records.append(record)
        if not rank_files:
            return
        scratch = self.output_path.with_name(f".{self.output_path.name}.merging")
        with open(scratch, "w", encoding="utf-8") as file:
            file.writelines(dumps(record)[0] + "\n" for record in records)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, self.output_path)
        for path in rank_files:
            path.unlink()


def _first_line_is_header(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as file:
        first = file.readline()
    try:
        return isinstance(record := json.loads(first), dict) and RANK_FILE_HEADER in record
    except json.JSONDecodeError:
        return False


def _no_counts() -> dict[str, int]:
    """This run's counts: batches seen, predictions written, ids already there, non-finite numbers
    written as null, and predictions written with a reward that is not a finite number."""
    return {"batches": 0, "written": 0, "duplicates": 0, "nonfinite": 0, "null_rewards": 0}


def _summed(trainer: Any, counts: dict[str, int]) -> dict[str, int]:
    """The counts of every process added up (each process writes its own share of the batches)."""
    import torch

    keys = sorted(counts)
    local = torch.tensor([counts[key] for key in keys], dtype=torch.int64, device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(local, reduce_op="sum")
    return dict(zip(keys, (int(value) for value in total.tolist())))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def problem_of(path: Path, counts: dict[str, int]) -> str | None:
    """Why a run's output is of no use, or None.

    Nothing written although batches were served (the module returned no prediction: every
    prompt skipped), or a NaN (null) reward for every prediction written. A run with no batch to
    serve (a resumed run with nothing left) and ids already in the file are not problems.
    """
    batches, written, nulls = counts["batches"], counts["written"], counts["null_rewards"]
    if batches and not written and not counts["duplicates"]:
        return (
            f"nothing was written to {path}: no prediction came from the {batches} batch"
            f"{'es' if batches > 1 else ''} served (skipped prompts are named in the warnings above)"
        )
    if written and nulls == written:
        return f"every reward written to {path} is NaN: {nulls} of {written} predictions have reward null"
    return None


def summary(path: Path, counts: dict[str, int], seconds: float) -> str:
    """Where the outputs are, what they hold, and what this run added."""
    records = read_records(path)
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float)) and math.isfinite(r["reward"])]
    stats = [r.get("stats") or {} for r in records]
    tokens = sum(s.get("tokens_generated", 0) for s in stats)
    engine_seconds = sum(s.get("generation_seconds", 0.0) + s.get("reward_seconds", 0.0) for s in stats)
    mean = f"{sum(rewards) / len(rewards):.4f}" if rewards else "n/a"
    lines = [
        f"\nPredictions: {path.resolve()}",
        f"  prompts: {len(records)}  mean reward of chosen responses: {mean}",
        f"  tokens generated: {tokens}  generation + reward seconds: {engine_seconds:.1f}",
        f"  this run: {counts['written']} prompts written in {seconds:.1f} s",
    ]
    if counts["duplicates"]:
        lines[-1] += f", {counts['duplicates']} already in the file (not written again)"
    if counts["nonfinite"]:
        lines.append(f"  {counts['nonfinite']} non-finite numbers (NaN/inf) written as null")
    if counts.get("null_rewards"):
        lines.append(f"  {counts['null_rewards']} of the {counts['written']} rewards written this run are NaN (null)")
    return "\n".join(lines)
