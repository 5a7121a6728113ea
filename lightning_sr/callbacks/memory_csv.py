"""CsvBuffer: rows kept in memory and appended to one CSV file in chunks.

GPUMemoryProfiler records a row per batch and per decoding step; writing each one would put file
I/O inside the training and decoding loops, keeping them all would grow without bound on long
runs. The buffer writes the header with the first chunk and appends every ``flush_every`` rows
and on :meth:`CsvBuffer.flush`.
"""

from __future__ import annotations

import csv
from pathlib import Path

FLUSH_EVERY = 1000
"""Buffered rows per file before they are appended to disk (bounds memory on long runs)."""


class CsvBuffer:
    """Rows kept in memory and appended to ``path`` every ``flush_every`` rows and on flush.

    The first flush (re)creates the file with its header, even with no rows; later ones append
    (and do nothing without rows). Keys of a row that are not in ``columns`` are ignored, missing
    ones are written empty.
    """

    def __init__(self, path: Path, columns: tuple[str, ...], flush_every: int = FLUSH_EVERY) -> None:
        self.path = path
        self.columns = columns
        self.flush_every = flush_every
        self.rows: list[dict] = []
        self.count = 0
        """Rows added so far, written or not."""
        self._started = False

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows and self._started:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a" if self._started else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if not self._started:
                writer.writeheader()
            writer.writerows(self.rows)
        self._started = True
        self.rows.clear()
