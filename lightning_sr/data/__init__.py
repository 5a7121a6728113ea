"""LightningDataModules for JSONL prompt files and preference pairs."""

import importlib

_LAZY = {
    "PromptDataModule": "lightning_sr.data.prompts",
    "PreferenceDataModule": "lightning_sr.data.preferences",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_sr.data' has no attribute {name!r}")


__all__ = list(_LAZY)
