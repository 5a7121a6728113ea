"""Lightning callbacks: memory profiling, prediction writing, online and offline merging.

Names are imported on first use so that one callback's optional dependencies never slow or break
the others.
"""

import importlib

_LAZY = {
    "GPUMemoryProfiler": "lightning_sr.callbacks.memory",
    "JSONLPredictionWriter": "lightning_sr.callbacks.predictions",
    "OnlineMerging": "lightning_sr.callbacks.merging",
    "OfflineMerge": "lightning_sr.callbacks.offline_merge",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_sr.callbacks' has no attribute {name!r}")


__all__ = list(_LAZY)
