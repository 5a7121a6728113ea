"""Where a long generation is, shown on Lightning's own progress bar (TQDM or Rich) mid-batch.

Speculative rejection decodes a whole batch inside one ``predict_step``, so the bar's batch count
stands still for minutes; :func:`show_status` writes a short status (tokens, live rows,
tokens/s, elapsed) next to it while the batch decodes.

It lives beside the modules and callbacks rather than in either: the module that decodes
(:class:`~lightning_sr.modules.generation.SpeculativeRejectionModule`) writes the status, and
the bar it writes to is a callback of the Trainer's, so neither package has to import the other
(data flows module → callbacks, never back). It reads the bar through the Trainer only, with
duck typing, so it works for both Lightning packages and imports neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["show_status"]


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
