"""JSON Lines in and out: strict JSON, errors that name the file and line, torn last lines.

Inputs (prompt, preference and SFT files) are read with :func:`read_objects`, which names the
file and line of anything wrong. Outputs (predictions) are written with :func:`dumps`, which keeps
every line strict JSON (``NaN`` and infinities become ``null``), and read back with
:func:`read_records`, which tolerates the torn last line a killed writer leaves behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line of a UTF-8 file (1-based numbers).

    Splits on ``"\\n"`` only: JSON text may hold characters that ``str.splitlines`` breaks at.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file (and the line, for bad bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if line.strip():
            yield number, line


def read_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each line of a JSONL file; a line that is not a JSON object
    raises ``ValueError`` naming the file and line. ``NaN`` and infinities are refused."""
    for number, line in read_lines(path):
        try:
            value = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as error:
            message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            raise ValueError(f"{path}:{number}: not valid JSON ({message})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value


def dumps(record: Any) -> tuple[str, int]:
    """One strict JSON line for ``record`` and how many non-finite numbers became ``null``."""
    count = 0

    def finite(value: Any) -> Any:
        nonlocal count
        if isinstance(value, float) and not math.isfinite(value):
            count += 1
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    line = json.dumps(finite(record), ensure_ascii=False, allow_nan=False)
    return line, count


def read_records(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a JSONL output file we wrote (no file: none).

    A torn last line (a run killed mid-write) is dropped with a warning, and with ``repair`` cut
    from the file so later appends start on a fresh line; a bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]  # ``last`` is "" when the file ends with a newline
    records = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not valid JSON; fix or remove the line to resume") from None
    if last.strip():
        try:
            records.append(json.loads(last))
            if repair:
                with open(path, "a", encoding="utf-8") as file:
                    file.write("\n")
        except json.JSONDecodeError:
            log.warning("%s:%d: dropping a partly written last line", path, len(lines))
            if repair:
                with open(path, "r+", encoding="utf-8") as file:
                    file.truncate(len(text.encode("utf-8")) - len(last.encode("utf-8")))
    return records


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
