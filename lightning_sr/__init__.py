"""lightning-sr: Speculative Rejection, online merging optimizers and memory profiling for Lightning.

- Engine (plain PyTorch + transformers, no Lightning): :mod:`lightning_sr.generation`,
  :mod:`lightning_sr.rewards`, :mod:`lightning_sr.losses`, :mod:`lightning_sr.optim`,
  :mod:`lightning_sr.merging`, :mod:`lightning_sr.chat`.
- Lightning: :mod:`lightning_sr.modules`, :mod:`lightning_sr.data`, :mod:`lightning_sr.callbacks`,
  :mod:`lightning_sr.cli`; each class works with ``lightning.pytorch`` and ``pytorch_lightning``
  (see :mod:`lightning_sr.lightning_packages`).

Names load on first use, so ``import lightning_sr.generation`` stays light.
"""

import logging
from typing import TYPE_CHECKING

from lightning_sr._lazy import lazy_names

__version__ = "0.2.0"

if TYPE_CHECKING:
    from lightning_sr.chat import Prompt
    from lightning_sr.modules.generation import SpeculativeRejectionModule
    from lightning_sr.modules.preference import PreferenceModule
    from lightning_sr.modules.sft import SFTModule
    from lightning_sr.sharding import FSDP2Strategy

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "SpeculativeRejectionModule": "lightning_sr.modules.generation",
        "PreferenceModule": "lightning_sr.modules.preference",
        "SFTModule": "lightning_sr.modules.sft",
        "FSDP2Strategy": "lightning_sr.sharding",
        "Prompt": "lightning_sr.chat",
    },
)
__all__ = ["SpeculativeRejectionModule", "PreferenceModule", "SFTModule", "FSDP2Strategy", "Prompt", "__version__"]

# Our messages (resuming, skipped prompts, merges) show at INFO, as Lightning's own do, unless the
# program configured logging itself.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
