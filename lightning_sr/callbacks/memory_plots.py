"""PNG plots of GPUMemoryProfiler's CSVs (matplotlib, object-oriented API: no pyplot state).

``plot_batches``: memory per recorded batch, one panel per phase (train, validation, ...).
``plot_generation``: the paper's Figure 1 view of a decoding run: memory and KV-cache bytes
against generated length (log2 axis), live rows on a second axis, rejection points as vertical
dashed lines. One panel per decoding run (one per predict batch, usually), at most
``MAX_GENERATION_PANELS`` of them; every run is in the CSV.

Importing this module raises ImportError when matplotlib is missing; the callback turns that
into a warning and keeps the CSVs.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_GENERATION_PANELS = 12
_MIB = 2.0**20

_BATCH_SERIES = {
    "allocated_bytes": "allocated",
    "reserved_bytes": "reserved",
    "peak_allocated_bytes": "peak allocated in batch",
    "nvml_used_bytes": "device used (NVML)",
    "rss_bytes": "process RSS",
    "peak_rss_bytes": "process peak RSS (lifetime)",
}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mib(value: str) -> float:
    return float(value) / _MIB if value not in ("", None) else math.nan


def plot_batches(csv_path: str | Path, png_path: str | Path) -> Path:
    """Memory (MiB) per recorded batch, one panel per phase."""
    rows = _read(Path(csv_path))
    phases: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        phases[row["phase"]].append(row)
    fig = Figure(figsize=(8, 3.2 * max(1, len(phases))), layout="constrained")
    axes = fig.subplots(max(1, len(phases)), 1, squeeze=False)[:, 0]
    for ax, (phase, phase_rows) in zip(axes, phases.items()):
        x = list(range(len(phase_rows)))
        for column, label in _BATCH_SERIES.items():
            if column not in phase_rows[0] or all(r[column] == "" for r in phase_rows):
                continue
            ax.plot(x, [_mib(r[column]) for r in phase_rows], label=label, linewidth=1.2)
        device = phase_rows[0]["device"]
        ax.set_title(f"{phase_rows[0]['stage']} / {phase} on {device}")
        ax.set_xlabel("recorded batch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.savefig(png_path, dpi=100)
    return Path(png_path)


def plot_generation(csv_path: str | Path, png_path: str | Path) -> Path:
    """Figure-1 view per decoding run: memory and KV cache vs generated length, live rows, rejections."""
    rows = _read(Path(csv_path))
    runs: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        runs[row["run"]].append(row)
    shown = list(runs.items())[:MAX_GENERATION_PANELS]
    cols = min(3, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    for ax, (_, run_rows) in zip(axes, shown):
        plot_run(ax, run_rows)
    if len(runs) > len(shown):
        fig.suptitle(
            f"first {len(shown)} of {len(runs)} decoding runs; all are in {Path(csv_path).name}"
        )
    fig.savefig(png_path, dpi=100)
    return Path(png_path)


def plot_run(ax, rows: list[dict]) -> None:
    """One decoding run's rows of a generation CSV on ``ax``: memory and KV cache over the
    generated length (log2), live rows on a second axis, rejections as dashed lines."""
    rows = [r for r in rows if int(r["step"]) > 0]  # log2 axis: generated length starts at 1
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    memory_label = "allocated" if rows[0]["memory_kind"] == "allocated_bytes" else "process RSS"
    ax.plot(steps, [_mib(r["memory_bytes"]) for r in rows], color="tab:blue", label=memory_label)
    ax.plot(
        steps,
        [_mib(r["kv_bytes"]) for r in rows],
        color="tab:green",
        linestyle=":",
        label="KV cache",
    )
    ax.set_xlabel("generated length (tokens)")
    ax.set_ylabel(f"memory (MiB, {rows[0]['device']})")
    if max(steps) > 1:
        ax.set_xscale("log", base=2)
    rows_ax = ax.twinx()
    rows_ax.plot(
        steps,
        [int(r["live_rows"]) for r in rows],
        color="tab:orange",
        drawstyle="steps-post",
        label="live rows",
    )
    rows_ax.set_ylabel("live rows")
    rows_ax.set_ylim(bottom=0)
    first = True
    for r in rows:
        if int(r["rejected_rows"]) > 0:
            ax.axvline(
                int(r["step"]),
                color="tab:red",
                linestyle="--",
                linewidth=1,
                label="rejection" if first else None,
            )
            first = False
    ax.set_title(f"{rows[0]['phase']} batch {rows[0]['batch_idx']}")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = rows_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize="small", loc="best")
