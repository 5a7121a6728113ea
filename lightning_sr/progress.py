"""Where a long generation is, shown on Lightning's own progress bar (TQDM or Rich) mid-batch.

Speculative rejection decodes a whole batch inside one ``predict_step``, so the bar's batch count
stands still for minutes; :func:`show_status` writes a short status (tokens, live rows,
tokens/s, elapsed) next to it while the batch decodes, as long a one as the terminal's line
holds beside the bar (a line that wraps repaints as several).

It lives beside the modules and callbacks rather than in either: the module that decodes
(:class:`~lightning_sr.modules.generation.SpeculativeRejectionModule`) writes the status, and
the bar it writes to is a callback of the Trainer's, so neither package has to import the other
(data flows module → callbacks, never back). It reads the bar through the Trainer only, with
duck typing, so it works for both Lightning packages and imports neither.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["show_status"]

MIN_BAR_COLUMNS = 10
"""Columns a bar keeps beside the status: a status that leaves it fewer gives way to a shorter one."""


def show_status(trainer: Any, status: str | Sequence[str]) -> bool:
    """Put ``status`` on the trainer's predict progress bar; whether a person sees it there now.

    ``status`` is one text, or several from the longest to the shortest: the bar gets the longest
    whose whole line fits the terminal's width (else the shortest). False when there is no bar,
    or when the bar does not write to a terminal (a file, a CI log): there the longest status is
    kept for the bar's next line but not repainted 4 times a second, and the caller logs instead.
    """
    texts = [status] if isinstance(status, str) else list(status)
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not getattr(bar, "is_enabled", False):
        return False
    tqdm_bar = getattr(bar, "_predict_progress_bar", None)  # TQDMProgressBar
    if tqdm_bar is not None:
        live = _is_terminal(getattr(tqdm_bar, "fp", None))
        tqdm_bar.set_postfix_str(_fitting_tqdm(tqdm_bar, texts) if live else texts[0], refresh=live)
        return live
    progress, task = getattr(bar, "progress", None), getattr(bar, "predict_progress_bar_id", None)
    if progress is not None and task is not None:  # RichProgressBar
        live = bool(getattr(progress.console, "is_terminal", False))
        for text in texts if live else texts[:1]:  # the longest that fits; the shortest otherwise
            progress.update(task, description=f"{bar.predict_description} [{text}]")
            if _rich_line_fits(progress, task):
                break
        if live:
            bar.refresh()
        return live
    return False


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed stream
        return False


def _fitting_tqdm(tqdm_bar: Any, texts: list[str]) -> str:
    """The longest of ``texts`` whose bar line, with a bar of ``MIN_BAR_COLUMNS``, fits tqdm's width."""
    from tqdm.utils import disp_len  # tqdm is there: the bar is a tqdm

    line = dict(tqdm_bar.format_dict)  # tqdm's own width of the line: the terminal's, less one
    width = line.get("ncols")
    if not width or width <= 0:
        return texts[0]
    for text in texts:
        line.update(postfix=text, ncols=None)  # no width: a bar of 10 columns, tqdm's default
        if disp_len(tqdm_bar.format_meter(**line)) - 10 + MIN_BAR_COLUMNS <= width:
            return text
    return texts[-1]


def _rich_line_fits(progress: Any, task: Any) -> bool:
    """Whether the task's row of the Rich display, drawn at the console's width, stays one line
    with every column whole and a bar of at least ``MIN_BAR_COLUMNS`` (Rich squeezes the bar,
    then cuts and wraps the other columns, to make a long description fit)."""
    try:
        import io

        from rich.console import Console

        probe = Console(file=io.StringIO(), width=progress.console.width, color_system="standard", record=True)
        probe.print(progress.make_tasks_table([progress._tasks[task]]))  # in colour: the whole bar is drawn
        drawn = probe.export_text().rstrip("\n")
    except Exception:  # a Rich that draws otherwise: keep the longest text, as before
        return True
    return "\n" not in drawn and "…" not in drawn and sum(drawn.count(c) for c in "━╸╺") >= MIN_BAR_COLUMNS
