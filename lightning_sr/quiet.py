"""transformers without its per-load progress bars and notices, for the loaders and builders of ours.

Both :mod:`lightning_sr.loading` (every model, tokenizer and weight file we load) and
:mod:`lightning_sr.assets` (which builds the embedded default models that ``loading`` then reads)
keep transformers quiet while they work. The helper lives here, below both, so that data flows one
way: ``loading`` imports ``assets``, and neither ``assets`` nor this module imports ``loading``.
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["quiet_transformers"]


@contextmanager
def quiet_transformers():
    """transformers without progress bars and below-error log lines, restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
