"""lightning-sr's Lightning classes built on ``pytorch_lightning``, named explicitly.

``lightning_sr.pytorch_lightning.SpeculativeRejectionModule`` (and every other class in
``lightning_sr._lazy.LIGHTNING_CLASSES``) is a subclass of ``pytorch_lightning``'s base class whatever
else the program imports. The usual names (``lightning_sr.SpeculativeRejectionModule``, ...)
follow the package the program imported: see :mod:`lightning_sr.lightning_packages`.
"""

from lightning_sr._lazy import LIGHTNING_CLASSES, package_namespace

__getattr__, __dir__ = package_namespace(__name__, "pytorch_lightning")
__all__ = list(LIGHTNING_CLASSES)
