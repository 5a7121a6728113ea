"""Former home of :func:`~lightning_sr.progress.show_status`, kept so that existing imports work.

The helper moved to :mod:`lightning_sr.progress`, a neutral place: the module that decodes calls
it, and modules must not import callbacks (data flows module → callbacks). Import it from there.
"""

from lightning_sr.progress import show_status

__all__ = ["show_status"]
