"""Where a long generation is, shown on Lightning's own progress bar (TQDM or Rich) mid-batch.

Speculative rejection decodes a whole batch inside one ``predict_step``, so the bar's batch count
stands still for minutes; :func:`show_status` writes a short status (tokens, live rows,
tokens/s, elapsed) next to it while the batch decodes.
"""

from __future__ import annotations

from typing import Any


def show_status(trainer: Any, status: str) -> bool:
    """Put ``status`` on the trainer's predict progress bar; False when there is no bar to show it."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not getattr(bar, "is_enabled", False):
        return False
    tqdm_bar = getattr(bar, "_predict_progress_bar", None)  # TQDMProgressBar
    if tqdm_bar is not None:
        tqdm_bar.set_postfix_str(status, refresh=True)
        return True
    progress, task = getattr(bar, "progress", None), getattr(bar, "predict_progress_bar_id", None)
    if progress is not None and task is not None:  # RichProgressBar
        progress.update(task, description=f"{bar.predict_description} [{status}]")
        bar.refresh()
        return True
    return False
