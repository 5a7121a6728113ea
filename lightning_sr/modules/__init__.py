"""LightningModules: generation with speculative rejection, preference training (both Lightning packages)."""

from typing import TYPE_CHECKING

from lightning_sr._lazy import lazy_names

if TYPE_CHECKING:
    from lightning_sr.modules.generation import SpeculativeRejectionModule
    from lightning_sr.modules.preference import PreferenceModule

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "SpeculativeRejectionModule": "lightning_sr.modules.generation",
        "PreferenceModule": "lightning_sr.modules.preference",
    },
)
__all__ = ["SpeculativeRejectionModule", "PreferenceModule"]
