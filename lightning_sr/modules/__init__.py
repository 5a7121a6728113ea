"""LightningModules: generation with speculative rejection, supervised fine-tuning, preference training (both Lightning packages)."""

from typing import TYPE_CHECKING

from lightning_sr._lazy import lazy_names

if TYPE_CHECKING:
    from lightning_sr.modules.generation import SpeculativeRejectionModule
    from lightning_sr.modules.preference import PreferenceModule
    from lightning_sr.modules.sft import SFTModule

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "SpeculativeRejectionModule": "lightning_sr.modules.generation",
        "PreferenceModule": "lightning_sr.modules.preference",
        "SFTModule": "lightning_sr.modules.sft",
    },
)
__all__ = ["SpeculativeRejectionModule", "PreferenceModule", "SFTModule"]
