"""LightningDataModules for JSONL prompt files, SFT examples and preference pairs (both Lightning packages)."""

from typing import TYPE_CHECKING

from lightning_sr._lazy import lazy_names

if TYPE_CHECKING:
    from lightning_sr.data.preferences import PreferenceDataModule
    from lightning_sr.data.prompts import PromptDataModule
    from lightning_sr.data.sft import SFTDataModule

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "PromptDataModule": "lightning_sr.data.prompts",
        "PreferenceDataModule": "lightning_sr.data.preferences",
        "SFTDataModule": "lightning_sr.data.sft",
    },
)
__all__ = ["PromptDataModule", "PreferenceDataModule", "SFTDataModule"]
