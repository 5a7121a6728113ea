"""LightningModules: generation with speculative rejection, supervised fine-tuning, preference training (both Lightning packages).

Each name here (on ``lightning_sr``, and in its defining module: ``lightning_sr.modules.sft.SFTModule``)
is, once the Lightning package is known (your program imported it, or ``$LIGHTNING_SR_PACKAGE``
chose it), the class built for that package:
``issubclass(lightning_sr.modules.sft.SFTModule, lightning.pytorch.LightningModule)`` holds. Looked up
before, it is the class written once for both packages, whose instances are of the built class
(how: :mod:`lightning_sr.lightning_packages`).
"""

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
