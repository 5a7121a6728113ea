"""LightningModules: generation with speculative rejection, preference training."""

import importlib

_LAZY = {
    "SpeculativeRejectionModule": "lightning_sr.modules.generation",
    "PreferenceModule": "lightning_sr.modules.preference",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_sr.modules' has no attribute {name!r}")


__all__ = list(_LAZY)
