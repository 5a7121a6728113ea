"""Lightning callbacks: memory profiling, prediction writing, online and offline merging.

Each works with ``lightning.pytorch`` and ``pytorch_lightning`` (the class follows the package
your program imported). Ready-made YAML lists of them ship with the package: see
:func:`config_path` (``lightning-sr ... --trainer.callbacks+=lightning_sr:memory``).

The public names are the callbacks, :class:`GenerationHooks` (the methods a callback of yours may
define to follow a generation) and :func:`config_path`; everything else is importable from its
module (``lightning_sr.callbacks.predictions.summary``, ...).
"""

from pathlib import Path
from typing import TYPE_CHECKING

from lightning_sr._lazy import lazy_names

if TYPE_CHECKING:
    from lightning_sr.callbacks.hooks import GenerationHooks
    from lightning_sr.callbacks.memory import GPUMemoryProfiler
    from lightning_sr.callbacks.online_merging import OnlineMerging
    from lightning_sr.callbacks.offline_merge import OfflineMerge
    from lightning_sr.callbacks.predictions import JSONLPredictionWriter

CONFIGS = Path(__file__).parent / "configs"
"""The folder of the shipped callback YAML files (``memory.yaml``, ``online_merging.yaml``,
``predictions.yaml``) that :func:`config_path` names; not in ``__all__``: users name a file with
:func:`config_path`."""


def config_path(name: str) -> Path:
    """The shipped callback YAML ``name`` (``"memory"``, ...), for ``--trainer.callbacks+=<path>``.

    From a shell, in any LightningCLI project: ``--trainer.callbacks+=$(python -m
    lightning_sr.callbacks memory)``.
    """
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"no shipped callback config {name!r}; choose one of {names}")
    return path


__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "GPUMemoryProfiler": "lightning_sr.callbacks.memory",
        "JSONLPredictionWriter": "lightning_sr.callbacks.predictions",
        "OnlineMerging": "lightning_sr.callbacks.online_merging",
        "OfflineMerge": "lightning_sr.callbacks.offline_merge",
        "GenerationHooks": "lightning_sr.callbacks.hooks",
    },
)
__all__ = [
    "GPUMemoryProfiler",
    "JSONLPredictionWriter",
    "OnlineMerging",
    "OfflineMerge",
    "GenerationHooks",
    "config_path",
]
