"""Public names imported on first use, so that ``import lightning_sr.generation`` stays light and
one part's optional dependencies never slow or break another.

Each package ``__init__`` maps its public names to the modules that define them (and imports the
same names under ``TYPE_CHECKING`` for type checkers and IDEs). Lightning classes are resolved for
the program's Lightning package on every lookup (:func:`lightning_sr.lightning_packages.resolve`),
as their defining modules' attributes are; other names are cached in the package after the first
lookup.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Callable

LIGHTNING_CLASSES = {
    "SpeculativeRejectionModule": "lightning_sr.modules.generation",
    "PreferenceModule": "lightning_sr.modules.preference",
    "SFTModule": "lightning_sr.modules.sft",
    "PromptDataModule": "lightning_sr.data.prompts",
    "PreferenceDataModule": "lightning_sr.data.preferences",
    "SFTDataModule": "lightning_sr.data.sft",
    "GPUMemoryProfiler": "lightning_sr.callbacks.memory",
    "JSONLPredictionWriter": "lightning_sr.callbacks.predictions",
    "OnlineMerging": "lightning_sr.callbacks.online_merging",
    "OfflineMerge": "lightning_sr.callbacks.offline_merge",
    "LightningSRCLI": "lightning_sr.cli",
    "FSDP2Strategy": "lightning_sr.sharding",
}
"""Every public Lightning class of ours and the module that writes it."""


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` serving ``names`` (name → defining module)."""
    from lightning_sr.lightning_packages import resolve

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        if name in LIGHTNING_CLASSES:
            return resolve(value)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return _public(package, names)

    return __getattr__, __dir__


def _public(package: str, names) -> list[str]:
    """Public names, declared names and loaded submodules of ``package``: what ``dir()`` lists."""
    module = sys.modules[package]
    submodules = {n for n, v in vars(module).items() if isinstance(v, ModuleType) and v.__name__.startswith(package + ".")}
    return sorted(set(names) | set(getattr(module, "__all__", ())) | submodules)


def package_namespace(package: str, lightning_package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` of ``lightning_sr.lightning`` / ``lightning_sr.pytorch_lightning``:
    every Lightning class of ours built for that one Lightning package."""
    from lightning_sr.lightning_packages import for_package, written_class

    def __getattr__(name: str) -> Any:
        if name not in LIGHTNING_CLASSES:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        built = for_package(written_class(name), lightning_package)  # not the attribute: the active package's
        setattr(sys.modules[package], name, built)
        return built

    def __dir__() -> list[str]:
        return _public(package, LIGHTNING_CLASSES)

    return __getattr__, __dir__
