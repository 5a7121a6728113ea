"""lightning-sr: Speculative Rejection, online merging optimizers and memory profiling for Lightning.

The engine packages (``generation``, ``rewards``, ``losses``, ``optim``) import no Lightning; the
Lightning modules are loaded lazily here so ``import lightning_sr.generation`` stays light.
"""

__version__ = "0.1.0"

_LAZY = {
    "SpeculativeRejectionModule": "lightning_sr.modules.generation",
    "PreferenceModule": "lightning_sr.modules.preference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_sr' has no attribute {name!r}")


__all__ = ["SpeculativeRejectionModule", "PreferenceModule", "__version__"]
